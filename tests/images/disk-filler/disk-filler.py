"""Write into the folder the input names until the filesystem refuses, then print what got written as JSON.

Input: {"folder": "/output" or "/temp", "files": "one" (one file, 64 KiB at a time) or "many" (empty files),
"at_most": stop after this many bytes or files (optional)}. "found" is how many files an earlier run left.
"""
import json
import os

task = json.load(open("/input/input.txt"))
folder = os.path.join(task["folder"], "filler")
os.makedirs(folder, exist_ok=True)
at_most = task.get("at_most", float("inf"))
found = len(os.listdir(folder))
written = {"bytes": 0, "files": 0, "found": found, "error": None}
try:
    if task["files"] == "one":
        with open(os.path.join(folder, "big.bin"), "wb", buffering=0) as big:
            written["files"] = 1
            while written["bytes"] < at_most:
                written["bytes"] += big.write(b"\xa5" * 65536)
    else:
        while written["files"] < at_most:
            open(os.path.join(folder, f"f{found + written['files']}"), "wb").close()
            written["files"] += 1
except OSError as error:
    written["error"] = error.strerror
print("filler: " + json.dumps(written), flush=True)
