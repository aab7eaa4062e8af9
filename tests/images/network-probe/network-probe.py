"""Try to reach each host:port in the input and to resolve a name; report in /output/reach.json."""
import json
import socket

task = json.load(open("/input/input.txt"))
reach = {}
for address in task["addresses"]:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        reach[address] = "connected"
    except OSError as error:
        reach[address] = f"failed: {error}"
try:
    reach["dns"] = f"resolved: {socket.gethostbyname(task['name'])}"
except OSError as error:
    reach["dns"] = f"failed: {error}"
reach["interfaces"] = [name for _index, name in socket.if_nameindex()]
print(json.dumps(reach, indent=1))
with open("/output/reach.json", "w") as out:
    json.dump(reach, out)
