"""An algorithm as written for the original PyTaskManager, unchanged: it reads /input.txt, keeps its
state in /temp/ under RUN_ID, reads endpointUrl/endpointType/endpointToken, writes its own log to
/log.txt and its answer to /output.txt."""
import json
import os

inputText = open("/input.txt").read()
runId = os.environ["RUN_ID"]
stateFile = "/temp/round.txt"
roundNumber = int(open(stateFile).read()) + 1 if os.path.exists(stateFile) else 1
open(stateFile, "w").write(str(roundNumber))

logFile = open("/log.txt", "w")
logFile.write("internal log: round %d of run %s\n" % (roundNumber, runId))
logFile.close()

answer = {
    "input": inputText,
    "runId": runId,
    "round": roundNumber,
    "endpointUrl": os.environ["endpointUrl"],
    "endpointType": os.environ["endpointType"],
    "endpointToken": os.environ["endpointToken"],
}
outputFile = open("/output.txt", "w")
outputFile.write(json.dumps(answer))
outputFile.close()
print("pytaskmanager-style algorithm done")
