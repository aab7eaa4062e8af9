"""The logreg algorithm's arithmetic, without a container: its terms are the derivatives of its
log-likelihood, and its design matrix codes the literals as documented.

tests/test_federated_analyses.py runs the same code as an image at real sites.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parent.parent / "algorithms" / "logreg" / "logreg_step.py"
spec = importlib.util.spec_from_file_location("logreg_step", SOURCE)
logreg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(logreg)

XSD = "http://www.w3.org/2001/XMLSchema#"


def random_data(seed=1, n=60):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(60, 10, n), rng.integers(0, 2, n)])
    y = rng.integers(0, 2, n).astype(float)
    return X, y


def test_gradient_and_hessian_are_the_derivatives_of_the_log_likelihood():
    X, y = random_data()
    beta = np.array([-2.0, 0.03, 0.5])
    log_likelihood, gradient, hessian = logreg.local_terms(X, y, beta)
    step = 1e-6
    for j in range(len(beta)):
        shift = np.eye(len(beta))[j] * step
        up, gradient_up, _ = logreg.local_terms(X, y, beta + shift)
        down, gradient_down, _ = logreg.local_terms(X, y, beta - shift)
        assert (up - down) / (2 * step) == pytest.approx(gradient[j], rel=1e-6)
        assert (gradient_up - gradient_down) / (2 * step) == pytest.approx(hessian[:, j], rel=1e-5)


def test_terms_add_up_across_sites_to_the_pooled_terms():
    X, y = random_data()
    beta = np.array([0.1, -0.01, 0.2])
    pooled = logreg.local_terms(X, y, beta)
    first, second = logreg.local_terms(X[:25], y[:25], beta), logreg.local_terms(X[25:], y[25:], beta)
    for whole, part_a, part_b in zip(pooled, first, second):
        np.testing.assert_allclose(part_a + part_b, whole, rtol=1e-12)


def test_large_linear_predictors_do_not_overflow():
    X = np.array([[1.0, 1000.0], [1.0, -1000.0]])
    log_likelihood, gradient, hessian = logreg.local_terms(X, np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert np.isfinite([log_likelihood, *gradient, *hessian.ravel()]).all()


def test_literals_become_numbers_and_indicators():
    def literal(value, datatype=None):
        return {"type": "literal", "value": value, **({"datatype": XSD + datatype} if datatype else {})}

    rows = [{"v0": literal("1", "integer"), "v1": literal("63", "integer"), "v2": literal("female"),
             "v3": literal("true", "boolean")},
            {"v0": literal("0", "integer"), "v1": literal("48", "integer"), "v2": literal("male"),
             "v3": literal("false", "boolean")}]
    X, y = logreg.design_matrix(rows, ["age", "sex=female", "smoker"])
    np.testing.assert_array_equal(X, [[1, 63, 1, 1], [1, 48, 0, 0]])
    np.testing.assert_array_equal(y, [1, 0])
    with pytest.raises(ValueError, match="sex=female"):
        logreg.design_matrix(rows, ["sex", "age", "smoker"])


def test_query_asks_for_complete_cases_of_the_named_properties():
    query = logreg.complete_cases_query("outcome", ["age", "sex=female"])
    assert "SELECT ?v0 ?v1 ?v2" in query and "pht:outcome ?v0 ; pht:age ?v1 ; pht:sex ?v2" in query


@pytest.mark.parametrize("model, message", [
    ({"outcome": "outcome", "covariates": ["age"], "coefficients": [0, 0, 0]}, "must have 2 numbers"),
    ({"outcome": "outcome }", "covariates": ["age"]}, "outcome must name"),
    ({"outcome": "outcome", "covariates": ["age } ?x"]}, "covariates must be"),
    ({"outcome": "outcome\n", "covariates": ["age"]}, "outcome must name"),  # "$" would let it through
    ({"outcome": "outcome", "covariates": ["age\n"]}, "covariates must be"),
])
def test_bad_models_are_rejected_with_the_fix(model, message):
    with pytest.raises(ValueError, match=message):
        logreg.read_model(json.dumps(model))


def test_coefficients_default_to_zeros():
    outcome, covariates, coefficients = logreg.read_model('{"outcome": "outcome", "covariates": ["age", "stage"]}')
    np.testing.assert_array_equal(coefficients, [0, 0, 0])
