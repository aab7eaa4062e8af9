"""The summary algorithm's decisions, without a container: what it computes and what it refuses.

tests/test_federated_analyses.py runs the same code as an image at real sites.
"""

import importlib.util
import statistics
from fractions import Fraction
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "algorithms" / "summary" / "summarize.py"
spec = importlib.util.spec_from_file_location("summarize", SOURCE)
summarize = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize)

XSD = "http://www.w3.org/2001/XMLSchema#"


def test_numeric_summary_is_exact_and_matches_statistics():
    ages = [61, 47, 59, 72, 55, 38, 66, 80]
    summary = summarize.summarize(ages)
    assert summary["count"] == 8
    assert summary["sum"] == sum(ages) and summary["sum_of_squares"] == sum(a * a for a in ages)
    assert summary["mean"] == statistics.mean(ages)
    assert summary["variance"] == statistics.variance(ages)
    assert summary["histogram"] == {str(a): 1 for a in sorted(ages)}


def test_cut_points_make_open_ended_cells():
    summary = summarize.summarize([18, 49, 50, 59, 60, 95], cuts=[50, 60])
    assert summary["histogram"] == {"<50": 2, "[50, 60)": 2, ">=60": 2}


def test_booleans_count_as_zero_and_one_and_strings_only_as_categories():
    smokers = summarize.summarize([True, False, True, True])
    assert smokers["mean"] == 0.75 and smokers["histogram"] == {"false": 1, "true": 3}
    sex = summarize.summarize(["male", "female", "female"])
    assert "mean" not in sex and sex["histogram"] == {"female": 2, "male": 1}


def test_literals_are_read_by_their_datatype():
    assert summarize.literal_value({"datatype": XSD + "integer", "value": "63"}) == 63
    assert summarize.literal_value({"datatype": XSD + "decimal", "value": "0.1"}) == Fraction(1, 10)
    assert summarize.literal_value({"datatype": XSD + "boolean", "value": "true"}) is True
    assert summarize.literal_value({"type": "literal", "value": "female"}) == "female"


def test_small_nonempty_cells_are_named_without_their_counts():
    summaries = {"age": summarize.summarize([30, 55, 56, 57], cuts=[50]), "sex": summarize.summarize(["f"] * 4)}
    assert summarize.small_cells(4, summaries, min_count=3) == ["age <50"]
    assert summarize.small_cells(4, summaries, min_count=5) == [
        "the number of patients", "the number of patients with a value of age", "age <50", "age >=50",
        "the number of patients with a value of sex", "sex f"]
    assert summarize.small_cells(0, {"age": summarize.summarize([], cuts=[50])}, min_count=5) == []


@pytest.mark.parametrize("text, message", [
    ('["age"]', "JSON object"),
    ('{"variables": ["age; DROP"]}', "variables must be"),
    ('{"variables": ["age\\n"]}', "variables must be"),  # "$" would let it through
    ('{"min_count": 0}', "min_count"),
    ('{"variables": ["age"], "bins": {"stage": [1, 2]}}', "not among the variables"),
    ('{"bins": {"age": [60, 50]}}', "increasing"),
])
def test_bad_input_is_rejected_with_the_fix(text, message):
    with pytest.raises(ValueError, match=message):
        summarize.read_settings(text)


def test_empty_input_means_every_variable_and_the_default_minimum():
    assert summarize.read_settings("") == (summarize.DEFAULT_VARIABLES, {}, summarize.DEFAULT_MIN_COUNT)
