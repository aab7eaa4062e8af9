"""HAProxy (Debian's haproxy) in front of the registry's replicas, on loopback: for the tests and the
benchmarks, and the configuration docs/deployment.md gives an operator.

    .venv/bin/python -m scripts.balancer --port 8080 --replica 127.0.0.1:5001 --replica 127.0.0.1:5002

The timeouts follow the registry's (master/server.py): long-polls wait up to 120 s, so a quiet answer is
not a dead server until well after that; a request's head must be in within 10 s; idle kept-alive client
connections are closed after 60 s. Bodies stream through both ways (no
buffering): an upload of gigabytes goes on as long as it moves. A replica leaves the rotation when its
/health fails three times in a row (its database does not answer, or it is gone), and a
request whose connection to a replica fails is sent to another.
"""

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.processes import stop_process

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
LONGEST_WAIT_SECONDS = 120  # master/schemas.py: a site's claim wait_seconds (a researcher's is at most 60)


def haproxy_config(listen, replicas, check_seconds=2.0):
    """Pure: HAProxy's configuration for a balancer on listen ("host:port") in front of replicas
    (["host:port", ...]), which are asked for /health every check_seconds."""
    servers = "\n".join(f"    server replica{number} {address}" for number, address in enumerate(replicas, 1))
    quiet = LONGEST_WAIT_SECONDS + 60
    # No maxconn: haproxy then takes as many connections as its open-file limit allows.
    return f"""defaults
    mode http
    timeout connect 3s
    timeout http-request 10s
    timeout http-keep-alive 60s
    timeout client {quiet}s
    timeout server {quiet}s
    # A replica busy with thousands of long-polls may answer /health late: late is not down.
    timeout check 5s
    # A request that never reached a replica (its connection refused: the replica is gone) goes to
    # another. Not one that reached it: a task posted twice would be two tasks.
    retries 2
    option redispatch
    retry-on conn-failure

frontend registry
    bind {listen}
    default_backend replicas

backend replicas
    balance leastconn
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    default-server check inter {round(check_seconds * 1000)}ms fall 3 rise 2
{servers}
"""


class Balancer:
    """haproxy in the foreground, with its configuration in folder; a context manager."""

    def __init__(self, folder, listen, replicas, check_seconds=2.0):
        self.folder, self.listen = Path(folder), listen
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "haproxy.cfg"
        self.config.write_text(haproxy_config(listen, replicas, check_seconds))
        self.url = f"http://{listen}"
        self.process = None

    def start(self):
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refuses {self.config}: {check.stderr.strip() or check.stdout.strip()}")
        with open(self.folder / "haproxy.log", "ab") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT)
        return self

    def stop(self):
        if self.process is not None:
            stop_process(self.process)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--replica", action="append", required=True, metavar="HOST:PORT")
    parser.add_argument("--folder", type=Path, default=Path(".local/balancer"))
    args = parser.parse_args()
    with Balancer(args.folder, f"127.0.0.1:{args.port}", args.replica) as balancer:
        print(f"balancer: {balancer.url} -> {', '.join(args.replica)} (config: {balancer.config})", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while balancer.process.poll() is None:
            time.sleep(1)
    return balancer.process.returncode


if __name__ == "__main__":
    sys.exit(main())
