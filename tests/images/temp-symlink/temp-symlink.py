"""Leave links in /temp (named in the input: name -> target), then try to write through every link in /temp.

What happened is reported in /output/tried.json: link name -> "wrote" or "failed: ...".
"""
import json
import os

task = json.load(open("/input/input.txt"))
for name, target in task.get("links", {}).items():
    os.symlink(target, os.path.join("/temp", name))
tried = {}
for name in sorted(os.listdir("/temp")):
    path = os.path.join("/temp", name)
    if os.path.islink(path):
        try:
            with open(os.path.join(path, "written-through-a-link.txt"), "w") as out:
                out.write("escaped the session's folder")
            tried[name] = "wrote"
        except OSError as error:
            tried[name] = f"failed: {error}"
with open("/output/tried.json", "w") as out:
    json.dump(tried, out)
print("tried:", tried)
