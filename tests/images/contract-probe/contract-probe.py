"""Report what the container contract gives this algorithm, in /output/seen.json.

The input is reported byte for byte; if it is a JSON object it may ask the probe to
sleep first ({"sleep": 5}) or to exit with a code ({"exit": 3}).
"""
import base64
import json
import os
import sys
import time

raw = open("/input/input.txt", "rb").read()
try:
    task = json.loads(raw)
except ValueError:
    task = None
task = task if isinstance(task, dict) else {}


def writable(folder):
    probe = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        with open(probe, "w") as file:
            file.write("x")
        os.remove(probe)
        return True
    except OSError:
        return False


def first_readable(*paths):
    for path in paths:
        try:
            return open(path).read().strip()
        except OSError:
            continue
    return None


def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


# /temp lives as long as the session: count the tasks (and starts) that have seen it.
counter = "/temp/starts"
starts_before = int(open(counter).read()) if os.path.exists(counter) else 0
with open(counter, "w") as file:
    file.write(str(starts_before + 1))

seen = {
    "input_base64": base64.b64encode(raw).decode(),
    "input_txt_is_the_input": open("/input.txt", "rb").read() == raw,
    "environment": {name: os.environ.get(name) for name in (
        "SPARQL_ENDPOINT", "TASK_ID", "SESSION_ID", "SITE_NAME", "RUN_ID",
        "endpointUrl", "endpointType", "endpointToken")},
    "probe_version": os.environ.get("PROBE_VERSION"),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "effective_capabilities": status_field("CapEff"),
    "no_new_privileges": status_field("NoNewPrivs"),
    "writable": {folder: writable(folder) for folder in ("/", "/etc", "/app", "/input", "/output", "/temp", "/tmp")},
    "docker_socket_present": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
    "memory_limit": first_readable("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    "pids_limit": first_readable("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
    "temp_starts_before": starts_before,
}
with open("/output/seen.json", "w") as out:
    json.dump(seen, out)
print("probe: on stdout")
print("probe: on stderr", file=sys.stderr, flush=True)
time.sleep(task.get("sleep", 0))
sys.exit(task.get("exit", 0))
