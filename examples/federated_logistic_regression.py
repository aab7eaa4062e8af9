"""A logistic regression over several hospitals' patients, none of whom leaves their hospital.

Each round is one task: every site runs the logreg image (algorithms/logreg/) at the current
coefficients and answers with its gradient and Hessian; their sums give one Newton-Raphson step
here. All rounds belong to one session. It stops when no coefficient moves more than --tolerance.

    export PHT_REGISTRY_URL=https://registry.example.org PHT_TOKEN=...   # or ~/.config/pht/researcher.toml
    python examples/federated_logistic_regression.py --image registry.example.org/pht/logreg:latest

--pooled-data FILE.csv (one row per patient, a column per variable) also fits the same model on all
patients at once with statsmodels' Logit, an independent implementation, and prints the largest
difference. Only someone who can see every site's data can do that: the demo, with its synthetic
cohorts (scripts/demo.py), not a real researcher.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from researcher import (ImageNotPinned, RegistryError, SettingsError, TaskFailed, TaskTimeout,  # noqa: E402
                        connect, pin_to_digest)

COVARIATES = ["age", "sex=female", "stage", "smoker"]  # name=value: 1 for that value, else 0
OUTCOME = "outcome"


@dataclass
class FederatedFit:
    terms: list  # "intercept", then the covariates
    coefficients: np.ndarray
    rounds: int
    session_id: int
    patients: int


def fit_federated(registry, image, covariates=COVARIATES, outcome=OUTCOME, sites=None, tolerance=1e-8,
                  max_rounds=25, show=print):
    terms = ["intercept", *covariates]
    coefficients = np.zeros(len(terms))
    session_id = None
    image = pin_to_digest(image)  # once: every round runs the same algorithm, whatever happens to its tag meanwhile
    show(f"{'round':>5} {'log-likelihood':>15} " + " ".join(f"{term:>11}" for term in terms)
         + f" {'max change':>11} {'seconds':>7}")
    for round_number in range(1, max_rounds + 1):
        started = time.monotonic()
        task = registry.submit(image, {"outcome": outcome, "covariates": covariates,
                                       "coefficients": coefficients.tolist()},
                               sites=sites, session_id=session_id, name=f"logistic regression, round {round_number}")
        session_id = task["session_id"]
        answers = [result.output for result in registry.wait_for_results(task["id"])]
        gradient = sum(np.array(answer["gradient"]) for answer in answers)
        hessian = sum(np.array(answer["hessian"]) for answer in answers)
        step = np.linalg.solve(hessian, gradient)
        coefficients = coefficients - step
        change = np.abs(step).max()
        log_likelihood = sum(answer["log_likelihood"] for answer in answers)  # at the coefficients sent
        show(f"{round_number:>5} {log_likelihood:>15.6f} " + " ".join(f"{c:>11.6f}" for c in coefficients)
             + f" {change:>11.2e} {time.monotonic() - started:>7.1f}")
        if change < tolerance:
            patients = sum(answer["patients"] for answer in answers)
            registry.close_session(session_id)  # done: the sites may remove the session's /temp/
            return FederatedFit(terms, coefficients, round_number, session_id, patients)
    raise RuntimeError(f"no convergence after {max_rounds} rounds (last change {change:.2e}); "
                       "raise --max-rounds or --tolerance")


def fit_pooled(csv_file, covariates=COVARIATES, outcome=OUTCOME):
    """statsmodels' Logit on every patient at once; coefficients in the order of fit_federated's."""
    import pandas as pd
    import statsmodels.api as sm

    data = pd.read_csv(csv_file)
    columns = {}
    for covariate in covariates:
        name, is_indicator, level = covariate.partition("=")
        columns[covariate] = (data[name].astype(str) == level) if is_indicator else data[name]
    design = sm.add_constant(pd.DataFrame(columns).astype(float))
    return sm.Logit(data[outcome].astype(float), design).fit(method="newton", tol=1e-12, disp=False).params.to_numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the logreg algorithm image, e.g. registry.example.org/pht/logreg:latest")
    parser.add_argument("--registry", help="the registry's URL (default: $PHT_REGISTRY_URL or the config file)")
    parser.add_argument("--site", action="append", dest="sites", help="a site to include (repeat; default all)")
    parser.add_argument("--tolerance", type=float, default=1e-8, help="stop when no coefficient moves more (default 1e-8)")
    parser.add_argument("--max-rounds", type=int, default=25)
    parser.add_argument("--pooled-data", type=Path, help="CSV of every patient, to compare with statsmodels' Logit")
    args = parser.parse_args(argv)

    registry = connect(args.registry)
    print(f"Federated logistic regression: {OUTCOME} ~ {' + '.join(COVARIATES)}")
    fit = fit_federated(registry, args.image, sites=args.sites, tolerance=args.tolerance, max_rounds=args.max_rounds)
    print(f"converged after {fit.rounds} rounds (session {fit.session_id}), {fit.patients} patients")
    if args.pooled_data is None:
        return 0
    pooled = fit_pooled(args.pooled_data)
    print(f"\n{'term':<12} {'federated':>14} {'statsmodels':>14} {'difference':>11}")
    for term, ours, theirs in zip(fit.terms, fit.coefficients, pooled):
        print(f"{term:<12} {ours:>14.9f} {theirs:>14.9f} {abs(ours - theirs):>11.1e}")
    print(f"largest difference from statsmodels' pooled fit: {np.abs(fit.coefficients - pooled).max():.1e}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SettingsError, RegistryError, ImageNotPinned, TaskFailed, TaskTimeout) as error:
        sys.exit(f"error: {error}")
