"""Print a first line, the megabytes the input asks for (binary, no newlines), and a last line."""
import json
import sys

task = json.load(open("/input/input.txt"))
out = sys.stdout.buffer
out.write(b"FIRST LINE: what the algorithm set out to do\n")
piece = bytes(range(256)) * 4096  # 1 MiB
for _ in range(task["megabytes"]):
    out.write(piece)
out.write(b"\nLAST LINE: why it stopped\n")
out.flush()
