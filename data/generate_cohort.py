"""Generate a synthetic patient cohort for one site, as N-Triples. No real data is involved.

    python data/generate_cohort.py --site NAME --patients N --seed S --out FILE.nt

Vocabulary (prefix pht: = http://example.org/pht/vocab#):

    <http://example.org/pht/<site>/patient/<i>>   one patient, i = 1..N
        rdf:type     pht:Patient
        pht:age      xsd:integer, years (18-95)
        pht:sex      plain string, "female" or "male"
        pht:stage    xsd:integer, disease stage 1-4
        pht:smoker   xsd:boolean
        pht:outcome  xsd:integer, 1 = event, 0 = no event

Sites differ in case mix: age, sex, stage and smoking distributions are drawn per site from
(seed, site name), so every site gets its own population but the same inputs always give the same
cohort. The outcome follows one logistic model shared by all sites (OUTCOME_MODEL), so a pooled or
federated logistic regression has a known true answer to recover.
"""

import argparse
import math
import random
import re
from pathlib import Path

VOCAB = "http://example.org/pht/vocab#"
RDF_TYPE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#type"
XSD = "http://www.w3.org/2001/XMLSchema#"

# logit P(outcome = 1) = intercept + age * (age - 60) + stage * (stage - 2) + smoker * smoker
OUTCOME_MODEL = {"intercept": -1.0, "age": 0.04, "stage": 0.7, "smoker": 0.9}

SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def patient_iri(site, patient_id):
    return f"http://example.org/pht/{site}/patient/{patient_id}"


def site_parameters(rng):
    """Draw one site's case mix; the ranges keep every site plausible but distinguishable."""
    return {
        "mean_age": rng.uniform(50, 70),
        "age_sd": rng.uniform(8, 14),
        "female_share": rng.uniform(0.35, 0.65),
        "smoker_share": rng.uniform(0.10, 0.45),
        "stage_weights": [rng.uniform(0.5, 3.0) for _stage in range(4)],
    }


def outcome_probability(age, stage, smoker):
    logit = (
        OUTCOME_MODEL["intercept"]
        + OUTCOME_MODEL["age"] * (age - 60)
        + OUTCOME_MODEL["stage"] * (stage - 2)
        + OUTCOME_MODEL["smoker"] * int(smoker)
    )
    return 1 / (1 + math.exp(-logit))


def generate_cohort(site, patients, seed):
    """Return `patients` patient dicts (id, age, sex, stage, smoker, outcome) for `site`."""
    if not SITE_NAME.match(site):
        raise ValueError(f"site name {site!r} must use only letters, digits, '_' and '-' (it goes into IRIs)")
    if patients < 0:
        raise ValueError(f"number of patients must be 0 or more, got {patients}")
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across runs and
    # Python processes (unlike hash()), and mixing in the site name gives each site its own stream.
    rng = random.Random(f"{seed}:{site}")
    params = site_parameters(rng)
    cohort = []
    for patient_id in range(1, patients + 1):
        age = min(95, max(18, round(rng.gauss(params["mean_age"], params["age_sd"]))))
        sex = "female" if rng.random() < params["female_share"] else "male"
        stage = rng.choices([1, 2, 3, 4], weights=params["stage_weights"])[0]
        smoker = rng.random() < params["smoker_share"]
        outcome = int(rng.random() < outcome_probability(age, stage, smoker))
        cohort.append(
            {"id": patient_id, "age": age, "sex": sex, "stage": stage, "smoker": smoker, "outcome": outcome}
        )
    return cohort


def patient_triples(patient, site):
    subject = f"<{patient_iri(site, patient['id'])}>"
    smoker = "true" if patient["smoker"] else "false"
    return [
        f"{subject} <{RDF_TYPE}> <{VOCAB}Patient> .",
        f'{subject} <{VOCAB}age> "{patient["age"]}"^^<{XSD}integer> .',
        f'{subject} <{VOCAB}sex> "{patient["sex"]}" .',
        f'{subject} <{VOCAB}stage> "{patient["stage"]}"^^<{XSD}integer> .',
        f'{subject} <{VOCAB}smoker> "{smoker}"^^<{XSD}boolean> .',
        f'{subject} <{VOCAB}outcome> "{patient["outcome"]}"^^<{XSD}integer> .',
    ]


def write_ntriples(patients, site, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for patient in patients for line in patient_triples(patient, site)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate a seeded synthetic cohort as N-Triples.")
    parser.add_argument("--site", required=True, help="site name, used in patient IRIs")
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--seed", type=int, required=True, help="seed; same seed and site give the same cohort")
    parser.add_argument("--out", required=True, help="N-Triples file to write")
    args = parser.parse_args(argv)
    try:
        cohort = generate_cohort(args.site, args.patients, args.seed)
    except ValueError as error:
        parser.error(str(error))
    write_ntriples(cohort, args.site, args.out)
    print(f"generate_cohort: wrote {len(cohort)} patients of site {args.site} to {args.out}")


if __name__ == "__main__":
    main()
