"""Attacks on the relay pool (client/relay_pool.py): a run's SPARQL relay kept for its session's next run.

Each test drives a real runner process (client/runScript.py, network none: every run through a relay and a gateway)
against tests/fake_registry.py, which plays a hostile registry: it picks session ids, hands runs out again, cancels
them, and says which sessions are closed. The algorithm is tests/images/sparql-probe; its report.json says which
network namespace it was in and what it found there.
"""

import io
import json
import tarfile

import pytest

from client.officer_commands import Officer
from client.run_folder import parked_run
from client.site_config import load_site_config
from tests.fake_registry import Answer, FakeRegistry
from tests.images import BASE_IMAGE, engine_or_fail, pinned_test_image, relay_ids, wait_until_cleaned_up
from tests.test_hostile_registry import SITE, Site, claim, sparql_endpoint, wait_for_finish  # noqa: F401

ASK = {"name": "ask", "do": "http", "params": {"query": "ASK { ?s ?p ?o }"},
       "accept": "application/sparql-results+json", "timeout": 5}
NETNS = {"name": "netns", "do": "netns"}
LINGER_PORT = 7777
LINGER_NAME = "pht-review-left-behind"
LINGER = {"name": "linger", "do": "linger", "port": LINGER_PORT, "unix_name": LINGER_NAME}
# Keeps the algorithm running (querying) until the runner stops it.
KEEP_RUNNING = {"name": "loop", "do": "loop", "query": "ASK { ?s ?p ?o }", "seconds": 120, "interval": 0.5,
                "stop_file": "/temp/never-there", "progress_file": "/output/progress.jsonl"}
FIND_LEFT_OVERS = [{"name": "left", "do": "tcp", "addresses": [f"127.0.0.1:{LINGER_PORT}"]},
                   {"name": "net", "do": "net"}]


@pytest.fixture(scope="module")
def probe():
    engine_or_fail()
    return pinned_test_image("sparql-probe")


@pytest.fixture
def site(tmp_path, sparql_endpoint):  # noqa: F811 (the hostile registry tests' endpoint fixture)
    site = Site(tmp_path, FakeRegistry(SITE), sparql_endpoint)
    yield site
    site.tear_down()


def offer(site, run_id, image, steps, **fields):
    """A claim of the probe with these steps (its input, served when the runner downloads it)."""
    site.registry.script("input", Answer.text(json.dumps({"steps": steps})), run_id=run_id)
    site.registry.offer_claim(claim(run_id, image, **fields))


def uploaded_report(site, run_id):
    """The probe's report.json, from the last output the run uploaded."""
    upload = site.registry.requests("output", run_id=run_id)[-1]
    with tarfile.open(fileobj=io.BytesIO(upload.body), mode="r:gz") as archive:
        return json.load(archive.extractfile("report.json"))["steps"]


def report_on_disk(site, run_id):
    """The probe's report.json as it is now in the run's /output (None before it wrote one)."""
    path = site.work_dir / "runs" / str(run_id) / "disk" / "output" / "report.json"
    try:
        return json.loads(path.read_text())["steps"]
    except (OSError, ValueError):
        return None


def relays(site):
    return relay_ids(SITE, site.work_dir)


def settled(site):
    wait_until_cleaned_up(site.work_dir)


# --- defects ---------------------------------------------------------------------------------------------------

def test_a_relay_is_not_kept_for_a_session_whose_temp_was_removed_before_its_run_ended(site, probe):
    """The docs: a kept relay "is removed when the session's /temp is". A run held for review leaves its worker
    slot, so its session counts as unused: the registry says it is closed, and its /temp goes. The officer then
    releases the run; once it is reported its relay must not be kept for the closed session, past its /temp: a
    later run the registry names of that session would join it, and what a relay carries would cross a line /temp
    no longer does (the session's intermediate state gone, its relay not)."""
    runner = site.start_runner(airlock={"review": True})
    offer(site, 1101, probe, [ASK, NETNS], session_id=1100)
    runner.wait_for(lambda: parked_run(site.work_dir / "runs", 1101), "run 1101 is held for review", timeout=90)

    site.registry.defaults["closed-sessions"] = Answer.json({"closed": [1100]})
    runner.wait_for_log("session 1100: removed its /temp", "the closed session's /temp is removed")
    officer = Officer(load_site_config(runner.config_path), by="it-officer", out=lambda line: None)
    officer.review(1101, released=True)
    wait_for_finish(runner, 1101, timeout=60)
    settled(site)
    assert uploaded_report(site, 1101)["ask"]["status"] == 200
    assert not relays(site), "run 1101's relay was kept for session 1100 after its /temp was removed"


def stuck_relay_base_image():
    """A base image whose python3 never runs run 1201's relay (it sleeps instead, so the relay's container runs
    but never listens); the start-up self-test's relay and other runs' relays run as usual."""
    engine = engine_or_fail()
    wrapper = ("#!/bin/sh\n"
               "if [ \"$2\" = /pht/relay.py ] && grep -q '/runs/1201/gateway /gateway ' /proc/self/mountinfo; then\n"
               "  exec sleep 100000\n"
               "fi\n"
               "exec /usr/bin/python3 \"$@\"\n").encode()
    dockerfile = (f"FROM {BASE_IMAGE}\nCOPY python3 /usr/local/bin/python3\n"
                  "RUN chmod 755 /usr/local/bin/python3\n").encode()
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("python3", wrapper)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    context.seek(0)
    tag = "pht-test-stuck-relay-base:latest"
    engine.images.build(fileobj=context, custom_context=True, tag=tag, network_mode="none", pull=False, rm=True)
    return tag


def test_a_relay_that_never_listened_is_not_handed_to_the_sessions_next_run(site, probe):
    """A relay that did not start listening within wait_until_listening's time fails its run ("the SPARQL relay
    container did not start listening"); its container still runs, but must not be kept: the session's next run
    would take it and start its algorithm at once, with nothing listening, and the algorithm would run (and be
    reported) as if it had had a gateway. Only run 1201's relay is stuck: run 1202 gets one that listens."""
    runner = site.start_runner(sparql_gateway={"relay_base_image": stuck_relay_base_image()})
    offer(site, 1201, probe, [ASK, NETNS], session_id=1200)
    failed = wait_for_finish(runner, 1201, timeout=120)
    assert "did not start listening" in (failed["failure_reason"] or ""), failed
    settled(site)

    assert not relays(site), "the relay that never listened was kept"
    offer(site, 1202, probe, [ASK, NETNS], session_id=1200)
    report = wait_for_finish(runner, 1202, timeout=120)
    assert report["failure_reason"] is None, report
    assert uploaded_report(site, 1202)["ask"]["status"] == 200


# --- attacks that held (regression tests) ---------------------------------------------------------------------

def test_a_cancelled_runs_relay_goes_to_its_sessions_next_run_without_what_the_run_left(site, probe):
    """Cancelled while its algorithm runs, after leaving a process listening in the namespace: the next run of
    the session joins the kept relay and finds nothing of it."""
    runner = site.start_runner()
    offer(site, 1301, probe, [ASK, NETNS, LINGER, KEEP_RUNNING], session_id=1300, lease_seconds=3)
    runner.wait_for(lambda: (report_on_disk(site, 1301) or {}).get("linger"), "run 1301 left a process", timeout=90)
    first = report_on_disk(site, 1301)
    site.registry.defaults["heartbeat"] = Answer.json({"status": "cancelled"})
    runner.wait_for_log("run 1301: cancelled by the researcher", "run 1301 is cancelled")
    settled(site)
    site.registry.defaults["heartbeat"] = Answer.json({"status": "running"})
    assert not site.registry.requests("finish", run_id=1301)

    offer(site, 1302, probe, [ASK, NETNS, *FIND_LEFT_OVERS], session_id=1300)
    wait_for_finish(runner, 1302, timeout=90)
    second = uploaded_report(site, 1302)
    assert second["netns"] == first["netns"], "the cancelled run's relay was not kept for its session"
    assert second["left"][f"127.0.0.1:{LINGER_PORT}"].startswith("failed"), second["left"]
    assert second["net"]["listening"] == ["127.0.0.1:8890"], second["net"]
    assert LINGER_NAME not in second["net"]["abstract_unix"], second["net"]


def test_a_run_handed_out_again_under_another_session_does_not_get_the_first_claims_relay(site, probe):
    """The registry hands a running run out again, naming another session: the first claim's relay stays with the
    first session (its next run gets it, empty), and the second claim gets one of its own."""
    runner = site.start_runner(max_concurrent_runs=2)
    offer(site, 1401, probe, [ASK, NETNS, LINGER, KEEP_RUNNING], session_id=1400, lease_id="first")
    runner.wait_for(lambda: (report_on_disk(site, 1401) or {}).get("linger"), "run 1401 left a process", timeout=90)
    first = report_on_disk(site, 1401)

    offer(site, 1401, probe, [ASK, NETNS, *FIND_LEFT_OVERS], session_id=1410, lease_id="second")
    assert wait_for_finish(runner, 1401, timeout=90)["lease_id"] == "second"
    again = uploaded_report(site, 1401)
    assert again["ask"]["status"] == 200, again["ask"]
    assert again["netns"] != first["netns"], "a claim of another session joined the first claim's relay"
    assert again["left"][f"127.0.0.1:{LINGER_PORT}"].startswith("failed"), again["left"]

    offer(site, 1402, probe, [ASK, NETNS, *FIND_LEFT_OVERS], session_id=1400)
    wait_for_finish(runner, 1402, timeout=90)
    later = uploaded_report(site, 1402)
    assert later["ask"]["status"] == 200, later["ask"]
    assert later["left"][f"127.0.0.1:{LINGER_PORT}"].startswith("failed"), later["left"]
    assert LINGER_NAME not in later["net"]["abstract_unix"], later["net"]
