"""Try to change what must stay as it is; report each attempt, and the mounts, in /output/attempts.json."""
import json
import os


def attempt(action):
    try:
        action()
        return "done"
    except OSError as error:
        return f"refused: {error.strerror}"


def write(path, mode="w"):
    def action():
        with open(path, mode) as file:
            file.write("changed by the algorithm")
    return action


attempts = {
    "overwrite /input/input.txt": attempt(write("/input/input.txt")),
    "append to /input/input.txt": attempt(write("/input/input.txt", "a")),
    "create /input/extra.txt": attempt(write("/input/extra.txt")),
    "delete /input/input.txt": attempt(lambda: os.remove("/input/input.txt")),
    "overwrite /input.txt": attempt(write("/input.txt")),
    "create /etc/evil": attempt(write("/etc/evil")),
    "overwrite /app/input-writer.py": attempt(write("/app/input-writer.py")),
}
# Refused by file permissions or by a read-only mount? The mounts say which.
mount_options = {}
for line in open("/proc/self/mounts"):
    _device, mount_point, _kind, options = line.split()[:4]
    mount_options[mount_point] = options.split(",")
read_only = {path: "ro" in mount_options.get(path, []) for path in ("/", "/input", "/input.txt")}
print(json.dumps({"attempts": attempts, "read_only": read_only}, indent=1))
with open("/output/attempts.json", "w") as out:
    json.dump({"attempts": attempts, "read_only": read_only}, out)
