"""Leave links to files outside /output (named in the input) next to one honest result file."""
import json
import os

task = json.load(open("/input/input.txt"))
for name, target in task["links"].items():
    os.symlink(target, os.path.join("/output", name))
os.mkdir("/output/nested")
os.symlink("/etc", "/output/nested/etc-folder")
with open("/output/honest.txt", "w") as out:
    out.write("the only real result")
print("left links:", ", ".join(task["links"]))
