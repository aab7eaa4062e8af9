"""The examples' federated analyses on a real federation of three sites give what a central analysis
of the pooled patients gives: statsmodels' Logit to 1e-6, and the very same counts and means.

The pooled data comes from the cohorts the federation generated, which only a test (or the demo)
can see. Needs the summary and logreg images (scripts/setup.sh builds them).
"""

import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm

from examples.federated_logistic_regression import fit_federated
from examples.federated_summary import summarize_federated
from researcher import TaskFailed
from scripts.demo import write_pooled_cohort
from scripts.federation import IMAGE_REGISTRY, LocalFederation

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = f"{IMAGE_REGISTRY}/pht/summary:latest"
LOGREG = f"{IMAGE_REGISTRY}/pht/logreg:latest"
SITES = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def federation():
    with LocalFederation(site_names=SITES, patients_per_site=100) as fed:
        yield fed


@pytest.fixture(scope="module")
def pooled_patients(federation):
    return [patient for site in federation.sites.values() for patient in site.patients]


def test_federated_logistic_regression_equals_statsmodels_on_the_pooled_data(federation, pooled_patients):
    registry = federation.researcher()
    fit = fit_federated(registry, LOGREG, covariates=["age", "sex=female", "stage", "smoker"], show=lambda line: None)

    design = np.array([[1, p["age"], p["sex"] == "female", p["stage"], p["smoker"]] for p in pooled_patients], float)
    outcome = np.array([p["outcome"] for p in pooled_patients], float)
    pooled = sm.Logit(outcome, design).fit(disp=False).params
    assert np.abs(fit.coefficients - pooled).max() < 1e-6
    assert fit.patients == len(pooled_patients)

    rounds = list(registry.tasks(session_id=fit.session_id))
    assert len(rounds) == fit.rounds and all(task["status"] == "completed" for task in rounds)
    assert len({task["image"] for task in rounds}) == 1 and "@sha256:" in rounds[0]["image"], \
        "every round runs the image its tag named when the fit began"


def test_federated_summary_counts_and_means_equal_the_pooled_ones_exactly(federation, pooled_patients):
    per_site, pooled = summarize_federated(federation.researcher(), SUMMARY)

    assert set(per_site) == set(SITES)
    assert pooled["patients"] == len(pooled_patients)
    for variable in ("age", "stage", "smoker", "outcome"):
        values = [int(p[variable]) for p in pooled_patients]
        assert pooled["variables"][variable]["count"] == len(values)
        assert pooled["variables"][variable]["mean"] == statistics.mean(values)
        assert pooled["variables"][variable]["variance"] == pytest.approx(statistics.variance(values), rel=1e-12)
    assert pooled["variables"]["sex"]["histogram"] == {
        sex: sum(p["sex"] == sex for p in pooled_patients) for sex in ("female", "male")}
    for name, summary in per_site.items():
        assert summary["variables"]["age"]["count"] == len(federation.sites[name].patients)


def test_a_site_refuses_a_summary_whose_cells_would_be_too_small(federation):
    registry = federation.researcher()
    # One cell per year of age: some years have only a patient or two at every site.
    task = registry.submit(SUMMARY, {"variables": ["age"], "min_count": 5})
    with pytest.raises(TaskFailed) as failure:
        registry.wait_for_results(task["id"], timeout_seconds=120)

    assert {result.site for result in failure.value.failed} == set(SITES)
    for result in failure.value.failed:
        assert result.status == "failed" and result.exit_code != 0 and result.files == {}
        assert "refused: fewer than 5 patients (min_count) in: age" in result.log
    assert "hospital-a failed: algorithm exited with code 1 (log: summary: refused" in str(failure.value)


def test_partial_results_come_from_the_sites_that_answered(federation):
    """min_count 10 with age cut at 50, 60 and 70: sites with 1-9 patients in some cell refuse."""
    registry = federation.researcher()
    cuts = [50, 60, 70]
    refusing = {name for name, site in federation.sites.items()
                if any(0 < count < 10 for count in age_cells(site.patients, cuts))}
    assert refusing and refusing != set(SITES), "the seeded cohorts should make some but not all sites refuse"

    task = registry.submit(SUMMARY, {"variables": ["age"], "bins": {"age": cuts}, "min_count": 10})
    results = registry.wait_for_results(task["id"], timeout_seconds=120, accept_partial=True)

    assert {r.site for r in results if not r.ok} == refusing
    for result in results:
        if result.ok:
            assert result.output["variables"]["age"]["count"] == len(federation.sites[result.site].patients)


def test_the_examples_run_as_scripts_against_any_federation(federation, tmp_path):
    pooled_csv = write_pooled_cohort(federation, tmp_path / "pooled.csv")
    done = subprocess.run(
        [sys.executable, "examples/federated_summary.py", "--image", SUMMARY, "--pooled-data", str(pooled_csv),
         "--registry", federation.registry_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={"PHT_TOKEN": federation.researcher_token, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert f"Federated summary of {3 * 100} patients at 3 sites" in done.stdout
    assert "DIFFERENT" not in done.stdout and done.stdout.count(": equal") == 5


def age_cells(patients, cuts):
    cells = [0] * (len(cuts) + 1)
    for patient in patients:
        cells[sum(patient["age"] >= cut for cut in cuts)] += 1
    return cells
