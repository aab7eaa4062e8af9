"""Summarise this site's patients: per variable the count, mean, variance and a histogram.

Input (/input/input.txt), JSON, every key optional:

    {"variables": ["age", "sex", "stage", "smoker", "outcome"],  # pht: properties of a pht:Patient
     "bins": {"age": [40, 50, 60, 70, 80]},  # cut points of a numeric variable's histogram;
                                             # without, a variable has one cell per value
     "min_count": 5}                         # the smallest number of patients a cell may show

Output (/output/output.txt), JSON:

    {"patients": 120,
     "variables": {
       "age": {"count": 120, "sum": 7012, "sum_of_squares": 425386, "mean": 58.43, "variance": 142.1,
               "histogram": {"<40": 7, "[40, 50)": 21, ..., ">=80": 6}},
       "sex": {"count": 120, "histogram": {"female": 58, "male": 62}}}}

`sum` and `sum_of_squares` are exact (integers for integer data), so a researcher can pool the
sites' means and variances exactly. If any count other than 0 is below min_count, the algorithm
writes nothing and exits 1, naming the cell but not its count: a small cell could single out a patient.
"""

import json
import os
import re
import sys
from fractions import Fraction
from pathlib import Path

from SPARQLWrapper import JSON, SPARQLWrapper

INPUT_FILE = Path("/input/input.txt")
OUTPUT_FILE = Path("/output/output.txt")

DEFAULT_VARIABLES = ["age", "sex", "stage", "smoker", "outcome"]
DEFAULT_MIN_COUNT = 5
SHOWN_CELLS = 5  # a refusal names this many of the small cells; enough to see what to change
VARIABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # it goes into the SPARQL query: matched whole

PREFIX = "PREFIX pht: <http://example.org/pht/vocab#>\n"
COUNT_PATIENTS = PREFIX + "SELECT (COUNT(?patient) AS ?n) WHERE { ?patient a pht:Patient }"
VALUES_OF = PREFIX + "SELECT ?value WHERE {{ ?patient a pht:Patient ; pht:{variable} ?value }}"

XSD = "http://www.w3.org/2001/XMLSchema#"
INTEGER_TYPES = {XSD + name for name in ("integer", "int", "long", "short", "nonNegativeInteger", "positiveInteger")}
REAL_TYPES = {XSD + name for name in ("decimal", "double", "float")}


class Refused(Exception):
    """The site must not answer this request; the message says what to change."""


def read_settings(text):
    settings = json.loads(text) if text.strip() else {}
    if not isinstance(settings, dict):
        raise ValueError("the input must be a JSON object")
    variables = settings.get("variables", DEFAULT_VARIABLES)
    bins = settings.get("bins", {})
    min_count = settings.get("min_count", DEFAULT_MIN_COUNT)
    if not isinstance(variables, list) or not all(isinstance(v, str) and VARIABLE_NAME.fullmatch(v) for v in variables):
        raise ValueError(f"variables must be a list of names like \"age\", got {variables!r}")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a whole number of at least 1, got {min_count!r}")
    for variable, cuts in bins.items():
        if variable not in variables:
            raise ValueError(f"bins name {variable!r}, which is not among the variables {variables}")
        numbers = isinstance(cuts, list) and cuts and all(isinstance(c, (int, float)) for c in cuts)
        if not numbers or cuts != sorted(set(cuts)):
            raise ValueError(f"bins[{variable!r}] must be increasing numbers (cut points), got {cuts!r}")
    return variables, bins, min_count


def literal_value(binding):
    """A SPARQL JSON result value as Python: int, Fraction (exact decimals), bool or str."""
    datatype, text = binding.get("datatype"), binding["value"]
    if datatype in INTEGER_TYPES:
        return int(text)
    if datatype in REAL_TYPES:
        return Fraction(text)
    if datatype == XSD + "boolean":
        return text in ("true", "1")
    return text


def summarize(values, cuts=None):
    """The summary of one variable's values at this site (a pure function, tested directly)."""
    summary = {"count": len(values)}
    numeric = bool(values) and all(isinstance(v, (int, Fraction)) for v in values)  # bool is an int
    if numeric:
        total = sum(Fraction(v) for v in values)
        squares = sum(Fraction(v) ** 2 for v in values)
        n = len(values)
        summary.update(sum=_exact(total), sum_of_squares=_exact(squares), mean=float(total / n),
                       variance=float((squares - total ** 2 / n) / (n - 1)) if n > 1 else None)
    if cuts:
        if values and not numeric:
            raise ValueError("bins are given for a variable whose values are not all numbers")
        summary["histogram"] = histogram_with_cuts(values, cuts)
    else:
        summary["histogram"] = {_label(v): values.count(v) for v in sorted(set(values), key=_sort_key)}
    return summary


def histogram_with_cuts(values, cuts):
    labels = [f"<{cuts[0]}"] + [f"[{a}, {b})" for a, b in zip(cuts, cuts[1:])] + [f">={cuts[-1]}"]
    counts = [0] * len(labels)
    for value in values:
        counts[sum(value >= cut for cut in cuts)] += 1
    return dict(zip(labels, counts))


def small_cells(patients, summaries, min_count):
    """Names of the cells whose count is above 0 but below min_count."""
    def small(count):
        return 0 < count < min_count
    cells = ["the number of patients"] if small(patients) else []
    for variable, summary in summaries.items():
        if small(summary["count"]):
            cells.append(f"the number of patients with a value of {variable}")
        cells += [f"{variable} {label}" for label, count in summary["histogram"].items() if small(count)]
    return cells


def _exact(fraction):
    return fraction.numerator if fraction.denominator == 1 else float(fraction)


def _label(value):
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, Fraction)) else (1, 0, str(value))


def query(endpoint, text):
    sparql = SPARQLWrapper(endpoint)
    sparql.setQuery(text)
    sparql.setReturnFormat(JSON)
    return sparql.query().convert()["results"]["bindings"]


def main():
    endpoint = os.environ.get("SPARQL_ENDPOINT")
    if not endpoint:
        sys.exit("summary: SPARQL_ENDPOINT is not set; the site runner must pass the site's query URL")
    try:
        variables, bins, min_count = read_settings(INPUT_FILE.read_text(encoding="utf-8"))
    except ValueError as error:
        sys.exit(f"summary: {INPUT_FILE}: {error}")
    try:
        patients = int(query(endpoint, COUNT_PATIENTS)[0]["n"]["value"])
        values = {v: [literal_value(b["value"]) for b in query(endpoint, VALUES_OF.format(variable=v))]
                  for v in variables}
    except Exception as error:  # any failure of a query is reported the same way: which endpoint, why
        sys.exit(f"summary: query to {endpoint} failed: {error}")
    try:
        summaries = {v: summarize(values[v], bins.get(v)) for v in variables}
    except ValueError as error:
        sys.exit(f"summary: {error}")
    too_small = small_cells(patients, summaries, min_count)
    if too_small:
        more = f" and {len(too_small) - SHOWN_CELLS} more cells" if len(too_small) > SHOWN_CELLS else ""
        sys.exit(f"summary: refused: fewer than {min_count} patients (min_count) in: "
                 f"{'; '.join(too_small[:SHOWN_CELLS])}{more}. Ask for coarser bins or fewer variables.")
    OUTPUT_FILE.write_text(json.dumps({"patients": patients, "variables": summaries}), encoding="utf-8")
    print(f"summary: {patients} patients, variables {', '.join(variables)}")


if __name__ == "__main__":
    main()
