"""`python -m researcher` as a researcher uses it: a separate process, the URL and token in the
environment or a config file, against a real federation.

hospital-c is registered but has no runner, so its runs stay pending: that is the timeout.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from researcher.__main__ import cli as researcher_cli
from researcher.__main__ import describe_sparql
from scripts.federation import IMAGE_REGISTRY, LocalFederation

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = f"{IMAGE_REGISTRY}/pht/summary:latest"
OFF_THE_WHITELIST = f"{IMAGE_REGISTRY}/untrusted/summary:latest"  # no site pulls it, so it need not exist


@pytest.fixture(scope="module")
def federation():
    with LocalFederation(site_names=("hospital-a", "hospital-b", "hospital-c"), patients_per_site=30,
                         start_runners=False) as fed:
        fed.start_runner("hospital-a")
        fed.start_runner("hospital-b")
        registry = fed.researcher()
        deadline = time.monotonic() + 30
        while sum(site["online"] for site in registry.sites()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        yield fed


def cli_environment(home, registry_url, token, **environment):
    """The registry's URL and a token in the environment, and nothing else of ours."""
    # The engine's login stays: the CLI pins tags by asking the image registry through it.
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "DOCKER_CONFIG": str(Path.home() / ".docker"),
            "PHT_REGISTRY_URL": registry_url, "PHT_TOKEN": token, **environment}


@pytest.fixture
def cli(federation, tmp_path):
    """Run the CLI with the federation's URL and token in the environment, and nothing else of ours."""
    def run(*args, timeout=120, **environment):
        env = cli_environment(tmp_path, federation.registry_url, federation.researcher_token, **environment)
        return subprocess.run([sys.executable, "-m", "researcher", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="module", autouse=True)
def unreachable(tmp_path_factory):
    """`sites` against a registry that is not there, started before the module's federation: the library asks again
    for about 15 s before it gives up (researcher/client.py, READS_RETRIED), so the federation starts and the
    module's other tests run meanwhile; test_a_missing_or_wrong_token_is_one_line_naming_the_fix reads how it
    ended. (No registry is reached, so the token is never looked at.)"""
    env = cli_environment(tmp_path_factory.mktemp("unreachable"), "http://127.0.0.1:9", "pht_" + "x" * 43)
    process = subprocess.Popen([sys.executable, "-m", "researcher", "sites"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield process
    process.kill()
    process.communicate()


@pytest.fixture
def cli_in_process(federation, tmp_path):
    """The same CLI, run inside the test's process with click's runner."""
    def run(*args):
        env = {"PHT_REGISTRY_URL": federation.registry_url, "PHT_TOKEN": federation.researcher_token,
               "PHT_CONFIG": str(tmp_path / "no-config.toml"), "PHT_IDENTITY": None}
        return CliRunner().invoke(researcher_cli, list(args), env=env, catch_exceptions=False)
    return run


def table_rows(stdout):
    """A table's rows by their first column, for the rows naming a site."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.startswith("hospital-")}


def one_line_error(done):
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_sites_show_who_is_online_and_whose_sparql_answers(cli):
    table = cli("sites")
    assert table.returncode == 0, table.stderr
    rows = {site: columns[:2] for site, columns in table_rows(table.stdout).items()}
    assert rows == {"hospital-a": ["yes", "ok"], "hospital-b": ["yes", "ok"], "hospital-c": ["no", "unknown"]}

    sites = {site["name"]: site for site in json.loads(cli("sites", "--json").stdout)}
    assert sites["hospital-a"]["online"] and sites["hospital-a"]["sparql_ok"]
    assert not sites["hospital-c"]["online"] and sites["hospital-c"]["last_seen_at"] is None


def test_a_task_for_every_site_warns_of_the_site_that_never_polled(cli):
    submitted = cli("submit", SUMMARY, "--json")
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    # hospital-c has no runner (nor polled yet: this runs before the tests that report as it): its run would stay
    # pending, and the later tests' runs at hospital-c would queue behind it.
    assert cli("cancel", str(task["id"])).returncode == 0
    assert sorted(run["site"] for run in task["runs"]) == ["hospital-a", "hospital-b", "hospital-c"]
    assert submitted.stderr.startswith("warning: ") and submitted.stderr.count("\n") == 1, submitted.stderr
    assert "Never polled the registry: hospital-c." in submitted.stderr and "--site NAME" in submitted.stderr
    assert "hospital-a" not in submitted.stderr and "hospital-b" not in submitted.stderr


def test_submit_wait_and_fetch_results(cli, federation, tmp_path):
    config = tmp_path / "summary.json"
    config.write_text('{"variables": ["stage"], "min_count": 1}')
    submitted = cli("submit", SUMMARY, "--input-file", str(config), "--site", "hospital-a", "--site", "hospital-b",
                    "--name", "stages", "--json")
    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    task_id = str(task["id"])

    waited = cli("wait", task_id)
    assert waited.returncode == 0, waited.stderr
    assert f"task {task_id} (session {task['session_id']}): completed" in waited.stdout
    assert waited.stdout.count("completed") == 3  # the heading and each site's row

    results = {r["site"]: r for r in json.loads(cli("results", task_id, "--json").stdout)}
    for name in ("hospital-a", "hospital-b"):
        assert results[name]["exit_code"] == 0 and results[name]["image_digest"].startswith("sha256:")
        assert results[name]["files"] == ["output.txt"]
        assert results[name]["output"]["variables"]["stage"]["count"] == len(federation.sites[name].patients)
        assert "summary: 30 patients" in results[name]["log"]

    folder = tmp_path / "results"
    extracted = cli("results", task_id, "--output-dir", str(folder))
    assert extracted.returncode == 0, extracted.stderr
    assert json.loads((folder / "hospital-a" / "output.txt").read_text()) == results["hospital-a"]["output"]
    assert (folder / "hospital-b.log").read_text() == results["hospital-b"]["log"]

    listed = cli("tasks", "--session", str(task["session_id"]))
    assert listed.returncode == 0 and "stages" in listed.stdout and "2/2" in listed.stdout

    shown = cli("task", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "encrypted: no" in shown.stdout and "no files delivered to a third party" in shown.stdout
    history = [event["status"] for event in json.loads(cli("task", task_id, "--json").stdout)["runs"][0]["history"]]
    assert history == ["pending", "claimed", "running", "completed"]


def test_a_refused_run_fails_the_command_naming_the_site_and_why(cli):
    task_id = json.loads(cli("submit", OFF_THE_WHITELIST, "--no-pin", "--site", "hospital-a", "--json").stdout)["id"]

    waited = cli("wait", str(task_id))
    assert waited.returncode == 1
    error = one_line_error(waited)
    assert f"task {task_id}: 1 of 1 sites did not complete it: hospital-a refused:" in error
    assert OFF_THE_WHITELIST in error and "whitelist" in error

    assert cli("results", str(task_id)).returncode == 1
    partial = cli("results", str(task_id), "--partial", "--json")
    assert partial.returncode == 0
    [refused] = json.loads(partial.stdout)
    assert refused["status"] == "refused" and refused["files"] == [] and refused["image_digest"] is None


def test_waiting_too_long_times_out_and_the_task_can_be_cancelled(cli):
    task_id = json.loads(cli("submit", SUMMARY, "--site", "hospital-c", "--json").stdout)["id"]

    started = time.monotonic()
    waited = cli("wait", str(task_id), "--timeout", "1.5")
    assert waited.returncode == 3
    assert time.monotonic() - started < 15
    error = one_line_error(waited)
    assert f"task {task_id} not finished after 1.5 s (hospital-c: pending)" in error
    assert f"python -m researcher cancel {task_id}" in error

    cancelled = cli("cancel", str(task_id))
    assert cancelled.returncode == 0 and table_rows(cancelled.stdout)["hospital-c"][0] == "cancelled"
    assert json.loads(cli("tasks", "--status", "cancelled", "--json").stdout)[-1]["id"] == task_id
    assert cli("wait", str(task_id)).returncode == 1


def test_the_token_can_come_from_a_config_file_instead_of_the_environment(cli, federation, tmp_path):
    config = tmp_path / "researcher.toml"
    config.write_text(f'registry_url = "{federation.registry_url}"\ntoken = "{federation.researcher_token}"\n')
    done = cli("sites", PHT_TOKEN="", PHT_REGISTRY_URL="", PHT_CONFIG=str(config))
    assert done.returncode == 0, done.stderr
    assert "hospital-a" in table_rows(done.stdout)


def test_a_missing_or_wrong_token_is_one_line_naming_the_fix(cli, tmp_path, unreachable):
    missing = cli("sites", PHT_TOKEN="")
    assert missing.returncode == 1
    assert "no researcher token: set PHT_TOKEN or put token" in one_line_error(missing)

    wrong = cli("tasks", PHT_TOKEN="not-a-token")
    assert wrong.returncode == 1 and "401" in one_line_error(wrong) and "token" in wrong.stderr

    stdout, stderr = unreachable.communicate(timeout=120)
    answer = subprocess.CompletedProcess(unreachable.args, unreachable.returncode, stdout, stderr)
    assert answer.returncode == 1 and "cannot reach the registry" in one_line_error(answer)


def test_input_is_given_once(cli, tmp_path):
    config = tmp_path / "input.json"
    config.write_text("{}")
    done = cli("submit", SUMMARY, "--input", "{}", "--input-file", str(config))
    assert done.returncode == 2 and "not both" in done.stderr


def complete_at_hospital_c(federation, task_id, **report):
    """Run the task at hospital-c as a runner reports it, without a container: claim, start, finish."""
    site = requests.Session()
    site.headers["Authorization"] = f"Bearer {federation.sites['hospital-c'].token}"
    run = site.post(f"{federation.registry_url}/api/site/claim", json={"wait_seconds": 0}, timeout=10).json()
    assert run["task_id"] == task_id
    runs_url = f"{federation.registry_url}/api/site/runs/{run['id']}"
    site.post(f"{runs_url}/start", json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64},
              timeout=10).raise_for_status()
    site.post(f"{runs_url}/finish", json={"lease_id": run["lease_id"], "exit_code": 0, **report},
              timeout=10).raise_for_status()


def test_run_tables_show_what_each_site_read_through_its_sparql_gateway(cli_in_process, federation):
    summary = {"queries": 12, "bytes": 3_400_000, "refused": 1}
    task_id = json.loads(cli_in_process("submit", SUMMARY, "--site", "hospital-c", "--json").stdout)["id"]
    complete_at_hospital_c(federation, task_id, sparql=summary)

    waited = cli_in_process("wait", str(task_id))
    assert waited.exit_code == 0, waited.stderr
    assert table_rows(waited.stdout)["hospital-c"] == ["completed", "0", "12", "(1", "refused),", "3.4", "MB"]
    assert json.loads(cli_in_process("wait", str(task_id), "--json").stdout)["runs"][0]["sparql"] == summary
    assert "12 (1 refused), 3.4 MB" in cli_in_process("results", str(task_id)).stdout
    assert json.loads(cli_in_process("results", str(task_id), "--json").stdout)[0]["sparql"] == summary

    unreported = json.loads(cli_in_process("submit", SUMMARY, "--site", "hospital-c", "--json").stdout)["id"]
    cancelled = cli_in_process("cancel", str(unreported))
    assert table_rows(cancelled.stdout)["hospital-c"][:2] == ["cancelled", "-"]
    assert json.loads(cli_in_process("cancel", str(unreported), "--json").stdout)["runs"][0]["sparql"] is None


@pytest.mark.parametrize("summary, shown", [
    (None, "-"),
    ({"queries": 12, "bytes": 3_400_000, "refused": 1}, "12 (1 refused), 3.4 MB"),
    ({"queries": 3, "bytes": 512, "refused": 0}, "3, 512 B"),
    ({"queries": 1, "bytes": 999_960, "refused": 0}, "1, 1.0 MB"),  # not "1000.0 kB"
    ({"queries": 0, "bytes": 0, "refused": 0}, "0, 0 B"),
    ({"queries": 2 ** 63 - 1, "bytes": 2 ** 63 - 1, "refused": 2 ** 63 - 1},
     f"{2 ** 63 - 1} ({2 ** 63 - 1} refused), 9.2 EB"),
])
def test_a_sparql_summary_fits_one_table_cell(summary, shown):
    assert describe_sparql(summary) == shown

