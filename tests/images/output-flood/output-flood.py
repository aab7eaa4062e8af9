"""Write the megabytes the input asks for to /output, then linger for the seconds it asks."""
import json
import time

task = json.load(open("/input/input.txt"))
with open("/output/flood.bin", "wb") as out:
    for _ in range(task["megabytes"]):
        out.write(b"\0" * 2 ** 20)
print(f"wrote {task['megabytes']} MB", flush=True)
time.sleep(task["then_sleep"])
