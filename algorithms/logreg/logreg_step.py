"""One Newton-Raphson step of a logistic regression, this site's share of it.

The researcher sums every site's gradient and Hessian and takes the step centrally,
    new coefficients = coefficients - (sum of Hessians)^-1 (sum of gradients),
then sends the new coefficients in the next round, until they stop changing. Only these sums
leave the site, never a patient's row.

Input (/input/input.txt), JSON:

    {"outcome": "outcome",                                   # a pht: property holding 0 or 1
     "covariates": ["age", "sex=female", "stage", "smoker"], # numeric properties, or name=value
                                                             # for an indicator (1 if equal, else 0)
     "coefficients": [0, 0, 0, 0, 0]}                        # intercept first; omit for zeros

Output (/output/output.txt), JSON, at the given coefficients:

    {"patients": 120, "coefficients": [...], "log_likelihood": -71.3,
     "gradient": [...], "hessian": [[...], ...]}

Patients lacking the outcome or any covariate are left out (complete cases).
"""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from SPARQLWrapper import JSON, SPARQLWrapper

INPUT_FILE = Path("/input/input.txt")
OUTPUT_FILE = Path("/output/output.txt")

VARIABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # it goes into the SPARQL query: matched whole
XSD_BOOLEAN = "http://www.w3.org/2001/XMLSchema#boolean"


def read_model(text):
    """(outcome, covariates, coefficients) from the task input; ValueError naming the fix."""
    model = json.loads(text)
    if not isinstance(model, dict):
        raise ValueError("the input must be a JSON object with outcome, covariates and coefficients")
    outcome, covariates = model.get("outcome"), model.get("covariates")
    if not isinstance(outcome, str) or not VARIABLE_NAME.fullmatch(outcome):
        raise ValueError(f"outcome must name a property such as \"outcome\", got {outcome!r}")
    if not isinstance(covariates, list) or not all(
            isinstance(c, str) and VARIABLE_NAME.fullmatch(c.partition("=")[0]) for c in covariates):
        raise ValueError(f"covariates must be a list of names such as \"age\" or \"sex=female\", got {covariates!r}")
    coefficients = model.get("coefficients") or [0.0] * (len(covariates) + 1)
    if len(coefficients) != len(covariates) + 1:
        raise ValueError(f"coefficients must have {len(covariates) + 1} numbers (the intercept, then one per "
                         f"covariate), got {len(coefficients)}")
    return outcome, covariates, np.array(coefficients, dtype=float)


def complete_cases_query(outcome, covariates):
    properties = [outcome] + [covariate.partition("=")[0] for covariate in covariates]
    patterns = " ; ".join(f"pht:{name} ?v{index}" for index, name in enumerate(properties))
    columns = " ".join(f"?v{index}" for index in range(len(properties)))
    return ("PREFIX pht: <http://example.org/pht/vocab#>\n"
            f"SELECT {columns} WHERE {{ ?patient a pht:Patient ; {patterns} }}")


def design_matrix(rows, covariates):
    """(X with a leading column of ones, y) from the query's rows of literals (SPARQL JSON bindings)."""
    X = np.ones((len(rows), len(covariates) + 1))
    y = np.empty(len(rows))
    for i, row in enumerate(rows):
        y[i] = _number(row["v0"], "the outcome")
        for j, covariate in enumerate(covariates, start=1):
            name, is_indicator, level = covariate.partition("=")
            literal = row[f"v{j}"]
            X[i, j] = float(literal["value"] == level) if is_indicator else _number(literal, name)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("the outcome must be 0 or 1 for every patient")
    return X, y


def _number(literal, what):
    if literal.get("datatype") == XSD_BOOLEAN:
        return float(literal["value"] in ("true", "1"))
    try:
        return float(literal["value"])
    except ValueError:
        raise ValueError(f"{what} has a value that is not a number; for a category use name=value, "
                         "such as sex=female") from None


def local_terms(X, y, coefficients):
    """This site's log-likelihood, its gradient and its Hessian at the coefficients."""
    eta = X @ coefficients
    probability = np.exp(-np.logaddexp(0, -eta))  # 1 / (1 + e^-eta), without overflow
    log_likelihood = float(np.sum(y * eta - np.logaddexp(0, eta)))
    gradient = X.T @ (y - probability)
    hessian = -(X.T * (probability * (1 - probability))) @ X
    return log_likelihood, gradient, hessian


def main():
    endpoint = os.environ.get("SPARQL_ENDPOINT")
    if not endpoint:
        sys.exit("logreg: SPARQL_ENDPOINT is not set; the site runner must pass the site's query URL")
    try:
        outcome, covariates, coefficients = read_model(INPUT_FILE.read_text(encoding="utf-8"))
    except ValueError as error:
        sys.exit(f"logreg: {INPUT_FILE}: {error}")
    sparql = SPARQLWrapper(endpoint)
    sparql.setQuery(complete_cases_query(outcome, covariates))
    sparql.setReturnFormat(JSON)
    try:
        rows = sparql.query().convert()["results"]["bindings"]
    except Exception as error:  # any failure of the query is reported the same way: which endpoint, why
        sys.exit(f"logreg: query to {endpoint} failed: {error}")
    try:
        X, y = design_matrix(rows, covariates)
    except ValueError as error:
        sys.exit(f"logreg: {error}")
    log_likelihood, gradient, hessian = local_terms(X, y, coefficients)
    OUTPUT_FILE.write_text(json.dumps({
        "patients": len(y), "coefficients": coefficients.tolist(), "log_likelihood": log_likelihood,
        "gradient": gradient.tolist(), "hessian": hessian.tolist()}), encoding="utf-8")
    print(f"logreg: {len(y)} patients, log-likelihood {log_likelihood:.6f}")


if __name__ == "__main__":
    main()
