"""docs/data-model.md's queries, run on a cohort from data/generate_cohort.py: the page and the data agree."""

import re
from pathlib import Path

import rdflib

from data.generate_cohort import generate_cohort, write_ntriples

DATA_MODEL = Path(__file__).resolve().parent.parent / "docs" / "data-model.md"


def documented_queries():
    return re.findall(r"```sparql\n(.*?)```", DATA_MODEL.read_text(encoding="utf-8"), re.DOTALL)


def test_the_documented_queries_answer_on_a_generated_cohort(tmp_path):
    patients = generate_cohort("hospital-a", 40, 7)
    write_ntriples(patients, "hospital-a", tmp_path / "cohort.nt")
    graph = rdflib.Graph().parse(tmp_path / "cohort.nt", format="nt")

    count, rows = documented_queries()
    assert int(next(iter(graph.query(count)))[0]) == 40

    answered = sorted((int(row.age), int(row.stage), bool(row.smoker.toPython()), int(row.outcome))
                      for row in graph.query(rows))
    assert answered == sorted((patient["age"], patient["stage"], patient["smoker"], patient["outcome"])
                              for patient in patients)
