"""The main demo: a federated logistic regression over three hospitals, checked against statsmodels.

Starts a local federation (scripts/federation.py): the registry and, per hospital, a SPARQL endpoint
with its own synthetic cohort and a site runner. Then does what a researcher would, with the
registry's URL and token in the environment: lists the sites with the CLI and runs the two examples,
examples/federated_summary.py and examples/federated_logistic_regression.py.

Run it through scripts/demo.sh, which prepares the machine first. From a terminal, the federation then keeps
running until Ctrl-C, for trying the `pht` command against it (--keep-running / --no-keep-running decide).
"""

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from scripts.federation import IMAGE_REGISTRY, LocalFederation  # noqa: E402

SITES = ("hospital-a", "hospital-b", "hospital-c")
PATIENTS_PER_SITE = 300
SUMMARY_IMAGE = f"{IMAGE_REGISTRY}/pht/summary:latest"
LOGREG_IMAGE = f"{IMAGE_REGISTRY}/pht/logreg:latest"
STEP_TIMEOUT_SECONDS = 900
# The researcher's command, installed next to this Python by scripts/setup.sh (pyproject.toml).
PHT = Path(sys.executable).parent / "pht"


def write_pooled_cohort(federation, path):
    """Every site's patients in one CSV, for the examples' check against a pooled analysis.

    Only the demo can do this, because it generated the cohorts; a real researcher never sees
    the patients, which is the point of the whole system.
    """
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["site", "id", "age", "sex", "stage", "smoker", "outcome"])
        writer.writeheader()
        for site in federation.sites.values():
            writer.writerows({"site": site.name, **patient} for patient in site.patients)
    return path


def wait_until_sites_online(registry, timeout_seconds=30):
    deadline = time.monotonic() + timeout_seconds
    while not all(site["online"] for site in registry.sites()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every site polled the registry within {timeout_seconds} s; "
                               "see the runners' logs in the federation's logs/ folder")
        time.sleep(0.2)


def run_as_researcher(environment, *command):
    print(f"\n$ {' '.join(command)}", flush=True)
    program = str(PHT) if command[0] == "pht" else sys.executable
    return subprocess.run([program, *command[1:]], cwd=ROOT, env=environment,
                          timeout=STEP_TIMEOUT_SECONDS).returncode


def write_researcher_config(federation, path):
    """The researcher's config file for the demo's registry (URL and token), private to this user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    # JSON strings are TOML basic strings for this ASCII text.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as file:
        file.write(f"registry_url = {json.dumps(federation.registry_url)}\n"
                   f"token = {json.dumps(federation.researcher_token)}\n")
    return path


def keep_running(federation):
    config = write_researcher_config(federation, ROOT / ".local" / "demo" / "researcher.toml")
    print(f"\nThe federation keeps running until Ctrl-C. In another terminal, as its researcher:\n"
          f"  .venv/bin/pht --config {config.relative_to(ROOT)} sites\n"
          f"  .venv/bin/pht --config {config.relative_to(ROOT)} tasks", flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt
    # Ctrl-C, or a SIGTERM, stops the federation cleanly; a shell that started the demo in the background
    # would have it ignore SIGINT otherwise.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the federation")
    finally:
        config.unlink(missing_ok=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=sys.stdin.isatty(),
                        help="after the examples, keep the federation up until Ctrl-C (default: when run from a "
                             "terminal)")
    arguments = parser.parse_args()
    started = time.monotonic()
    with LocalFederation(site_names=SITES, patients_per_site=PATIENTS_PER_SITE) as federation:
        print(f"A local federation: registry at {federation.registry_url}; sites {', '.join(SITES)}, "
              f"{PATIENTS_PER_SITE} synthetic patients each, in their own SPARQL endpoint")
        wait_until_sites_online(federation.researcher())
        pooled = write_pooled_cohort(federation, federation.folder / "pooled-cohort.csv")
        environment = {**os.environ, "PHT_REGISTRY_URL": federation.registry_url,
                       "PHT_TOKEN": federation.researcher_token}
        steps = [
            ["pht", "sites"],
            ["python", "examples/federated_summary.py", "--image", SUMMARY_IMAGE, "--pooled-data", str(pooled)],
            ["python", "examples/federated_logistic_regression.py", "--image", LOGREG_IMAGE,
             "--pooled-data", str(pooled)],
        ]
        for step in steps:
            exit_code = run_as_researcher(environment, *step)
            if exit_code != 0:
                print(f"demo: `{' '.join(step)}` exited with code {exit_code}", file=sys.stderr)
                return exit_code
        print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
        if arguments.keep_running:
            keep_running(federation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
