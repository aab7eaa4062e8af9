"""Input: {"files": {"<recipient>/<name>": "<text>"}, "result": "<text>"}. Writes each file under
/output/to/ and the result to /output/result.txt."""

import json
from pathlib import Path

task = json.loads(Path("/input/input.txt").read_text())
for where, text in task["files"].items():
    path = Path("/output/to") / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
Path("/output/result.txt").write_text(task.get("result", "done"))
print(f"wrote {len(task['files'])} file(s) for third parties")
