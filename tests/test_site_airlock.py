"""The site's airlock and audit log on the real engine: results held until the IT officer releases them,
checks that refuse them before anyone looks, and the story of a federated round in each site's log."""

import shutil
import subprocess
import sys

import pytest
import requests

from client.audit_log import entries_of_run, verify
from client.officer_commands import Officer
from client.site_config import load_site_config
from master import lifecycle
from scripts.federation import ROOT, LocalFederation
from tests.images import algorithm_containers, engine_or_fail, output_files, pushed_test_image, run_log, run_of, wait_until

REVIEWING, PLAIN = "hospital-a", "hospital-b"

VETO_HOOK = """
import pathlib, sys
for path in pathlib.Path(sys.argv[1]).rglob("*"):
    if path.is_file() and b"row-level" in path.read_bytes():
        print(f"contains row-level data ({path.name})")
        sys.exit(1)
"""


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    engine_or_fail()
    hook = tmp_path_factory.mktemp("airlock") / "veto.py"
    hook.write_text(VETO_HOOK)
    with LocalFederation(site_names=(REVIEWING, PLAIN), patients_per_site=5, start_runners=False,
                         whitelist=[r"127\.0\.0\.1:[0-9]+/pht/.*"],
                         site_settings={"long_poll_seconds": 2, "poll_interval_seconds": 0.2}) as federation:
        federation.configure_site(REVIEWING, airlock={"review": True, "allowed_suffixes": [".txt"],
                                                      "check_command": [sys.executable, str(hook)]})
        for name in (REVIEWING, PLAIN):
            federation.start_runner(name)
        yield federation


@pytest.fixture(scope="module")
def writer():
    """Writes its input's "result" to /output/result.txt."""
    return pushed_test_image("ttp-sender")


def officer(federation):
    return Officer(load_site_config(federation.sites[REVIEWING].config_path), by="it-officer", out=lambda line: None)


def run_at(federation, task, site):
    [run] = [run for run in federation.researcher().task(task["id"])["runs"] if run["site"] == site]
    return run


def audit_path(federation, site):
    return federation.folder / site / "work" / "audit.jsonl"


def story(federation, site, run):
    return [(entry["event"], entry.get("what")) for entry in entries_of_run(audit_path(federation, site), run["id"])]


def not_at_registry(federation, run, kind):
    researcher = federation.researcher()
    response = researcher.http.get(f"{researcher.url}/api/runs/{run['id']}/{kind}", timeout=30)
    return response.status_code == 404


def test_a_round_is_held_at_the_reviewing_site_until_released_and_each_site_tells_its_story(federation, writer):
    researcher = federation.researcher()
    task = researcher.submit(writer, {"files": {}, "result": "mean age 47.5"})
    wait_until(lambda: run_at(federation, task, REVIEWING)["status"] == lifecycle.HELD_FOR_REVIEW,
               "the reviewing site holds the output", 120)
    held = run_at(federation, task, REVIEWING)
    assert held["reason"].startswith(f"held for review at {REVIEWING}")
    assert not_at_registry(federation, held, "output") and not_at_registry(federation, held, "log")
    assert not algorithm_containers(REVIEWING, federation.folder / REVIEWING / "work"), \
        "a held run's container waits with it, though what it left is packed"

    shown = []
    Officer(load_site_config(federation.sites[REVIEWING].config_path), out=shown.append).show_output(held["id"])
    assert any(line.endswith("result.txt") for line in shown)
    assert "mean age 47.5" in shown

    officer(federation).review(held["id"], released=True)
    runs = {run["site"]: run for run in researcher.wait(task["id"], timeout_seconds=120)["runs"]}
    assert {site: run["status"] for site, run in runs.items()} == {REVIEWING: "completed", PLAIN: "completed"}
    assert output_files(federation, runs[REVIEWING])["result.txt"] == b"mean age 47.5"

    for site in (REVIEWING, PLAIN):
        # The runner writes down what it sent and that it reported once the registry has the report: a moment
        # after the researcher sees the run end.
        wait_until(lambda: ("reported", None) in story(federation, site, runs[site]), f"{site} audits its report")
        verdict = verify(audit_path(federation, site))
        assert verdict.ok, verdict.problem
        events = story(federation, site, runs[site])
        assert events[:3] == [("claimed", None), ("image_pulled", None), ("policy", None)], events
        assert {("container_started", None), ("container_ended", None), ("sent", "output"), ("sent", "log"),
                ("reported", None)} <= set(events), events
    reviewed = story(federation, REVIEWING, runs[REVIEWING])
    # Nothing left before the officer released it.
    assert reviewed.index(("released", None)) < reviewed.index(("sent", "output"))
    assert ("held_for_review", None) not in story(federation, PLAIN, runs[PLAIN])


def test_the_audit_command_catches_a_removed_entry(federation, tmp_path):
    copy = tmp_path / "work"
    copy.mkdir()
    for name in ("audit.jsonl", "audit.jsonl.head"):
        shutil.copy(audit_path(federation, PLAIN).with_name(name), copy / name)
    lines = (copy / "audit.jsonl").read_bytes().splitlines(keepends=True)
    (copy / "audit.jsonl").write_bytes(b"".join(lines[:2] + lines[3:]))
    config = tmp_path / "config.json"
    config.write_text(federation.sites[PLAIN].config_path.read_text().replace(
        str(federation.folder / PLAIN / "work"), str(copy)))
    checked = subprocess.run([sys.executable, str(ROOT / "client" / "runScript.py"), "audit", "verify",
                              "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1
    assert "BROKEN after 2 good entries: line 3:" in checked.stderr


def test_a_rejected_output_never_leaves_and_the_researcher_sees_why(federation, writer):
    researcher = federation.researcher()
    task = researcher.submit(writer, {"files": {}, "result": "a table of 3 patients"}, sites=[REVIEWING])
    wait_until(lambda: run_of(federation, task)["status"] == lifecycle.HELD_FOR_REVIEW, "the output is held", 120)
    officer(federation).review(run_of(federation, task)["id"], released=False, reason="cells under 10 patients")
    [run] = researcher.wait(task["id"], timeout_seconds=60)["runs"]
    assert run["status"] == lifecycle.FAILED
    assert run["reason"] == ("its output was rejected by the site's IT officer (it-officer): cells under 10 "
                             "patients")
    assert not_at_registry(federation, run, "output") and not_at_registry(federation, run, "log")


@pytest.mark.parametrize("image, task_input, refusal", [
    ("ttp-sender", {"files": {}, "result": "row-level: patient 12, age 47"},
     "its check command refused it: contains row-level data (result.txt)"),
    ("contract-probe", {}, "a file is not among the file types it lets out (.txt)"),
])
def test_the_sites_checks_refuse_an_output_before_anyone_reviews_it(federation, image, task_input, refusal):
    researcher = federation.researcher()
    task = researcher.submit(pushed_test_image(image), task_input, sites=[REVIEWING])
    [run] = researcher.wait(task["id"], timeout_seconds=120)["runs"]
    assert run["status"] == lifecycle.FAILED
    assert run["reason"] == "the site's airlock refused the output: " + refusal
    assert lifecycle.HELD_FOR_REVIEW not in [event["status"] for event in researcher.run_history(run["id"])]
    assert not_at_registry(federation, run, "output") and not_at_registry(federation, run, "log")
    with pytest.raises(requests.HTTPError):
        run_log(federation, run)
