"""Count the patients in this site's data: the smallest complete PHT algorithm.

Copy this folder to write your own. The site runner gives the container:
  SPARQL_ENDPOINT       environment variable, the URL of the site's SPARQL query endpoint
  /input/input.txt      the task input from the researcher: empty, or a JSON object
  /output/output.txt    the answer, as JSON (the convention: the researcher library parses it into
                        result.output); everything under /output/ is sent back to the researcher
"""

import json
import os
import sys
from pathlib import Path

from SPARQLWrapper import JSON, SPARQLWrapper

INPUT_FILE = Path("/input/input.txt")
OUTPUT_FILE = Path("/output/output.txt")

COUNT_PATIENTS = """
PREFIX pht: <http://example.org/pht/vocab#>
SELECT (COUNT(?p) AS ?n) WHERE { ?p a pht:Patient }
"""


def read_task_input(path):
    text = path.read_text(encoding="utf-8").strip() if path.exists() else ""
    if not text:
        return {}
    try:
        task_input = json.loads(text)
    except json.JSONDecodeError as error:
        sys.exit(f"count_patients: {path} must be empty or JSON: {error}")
    return task_input if isinstance(task_input, dict) else {}


def count_patients(endpoint):
    sparql = SPARQLWrapper(endpoint)
    sparql.setQuery(COUNT_PATIENTS)
    sparql.setReturnFormat(JSON)
    bindings = sparql.query().convert()["results"]["bindings"]
    return int(bindings[0]["n"]["value"])


def main():
    endpoint = os.environ.get("SPARQL_ENDPOINT")
    if not endpoint:
        sys.exit("count_patients: SPARQL_ENDPOINT is not set; the site runner must pass the site's query URL")
    task_input = read_task_input(INPUT_FILE)
    try:
        patient_count = count_patients(endpoint)
    except Exception as error:  # any failure of the query is reported the same way: which endpoint, why
        sys.exit(f"count_patients: query to {endpoint} failed: {error}")
    result = {"patient_count": patient_count, "label": task_input.get("label")}
    OUTPUT_FILE.write_text(json.dumps(result), encoding="utf-8")
    print(f"count_patients: {patient_count} patients at {endpoint} (label: {result['label']})")


if __name__ == "__main__":
    main()
