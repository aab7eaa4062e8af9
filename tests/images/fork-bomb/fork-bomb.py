"""Fork until refused (children just wait), then report how many processes it got."""
import json
import os
import signal
import time

children, refusal = [], None
for _ in range(10_000):
    try:
        pid = os.fork()
    except OSError as error:
        refusal = str(error)
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(f"forked {len(children)} processes; then: {refusal}")
with open("/output/forks.json", "w") as out:
    json.dump({"forked": len(children), "refusal": refusal}, out)
