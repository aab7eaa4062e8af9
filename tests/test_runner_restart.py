"""Nothing is lost and nothing runs twice: a runner killed mid-run, a registry that goes down
while results are being sent, and the ways a runner is stopped on purpose (signals, --once)."""

import base64
import json
import os
import signal
import subprocess
import time

import docker
import pytest

from client import containers
from scripts.federation import PYTHON, ROOT, LocalFederation
from tests.images import engine_or_fail, only_run, output_json, pushed_test_image, run_of, states, wait_until

SITE = "hospital-a"


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    # A lease long enough to outlast the short outages these tests cause on purpose.
    with LocalFederation(site_names=(SITE,), patients_per_site=5, container_network="none", lease_seconds=20,
                         site_settings={"long_poll_seconds": 2, "poll_interval_seconds": 0.2}) as federation:
        yield federation


@pytest.fixture
def runner(federation):
    """The site's runner, running (its signal handlers set) at the start of the test and again at its end."""
    site = federation.sites[SITE]
    if site.runner is None or site.runner.poll() is not None:
        start_runner(federation)
    yield site
    if site.runner.poll() is not None:
        start_runner(federation)


def start_runner(federation):
    starts = federation.log_of(f"{SITE}-runner").count("runner started")
    federation.start_runner(SITE)
    wait_until(lambda: federation.log_of(f"{SITE}-runner").count("runner started") > starts, "the runner starts")


@pytest.fixture(scope="module")
def probe():
    return pushed_test_image("contract-probe")


def work_dir(federation):
    return federation.folder / SITE / "work"


def run_state(federation, run):
    path = work_dir(federation) / "runs" / str(run["id"]) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def container_of(federation, run):
    for container in containers.containers_of(docker.from_env(), SITE, work_dir(federation)):
        # The run's algorithm, not its SPARQL relay (which carries the run's labels too).
        if container.labels[containers.RUN_LABEL] == str(run["id"]) and containers.ROLE_LABEL not in container.labels:
            return container
    return None


def running_container(federation, task):
    wait_until(lambda: run_of(federation, task)["status"] == "running", "the run is running")
    run = run_of(federation, task)
    wait_until(lambda: (c := container_of(federation, run)) is not None and c.status == "running",
               "its container runs")
    return run, container_of(federation, run)


def starts_in_session(federation, task):
    """How often a container started in the task's session (the probe counts in /temp)."""
    return int((work_dir(federation) / "sessions" / str(task["session_id"]) / "temp" / "starts").read_text())


def test_runner_killed_mid_run_carries_on_after_restart(federation, runner, probe):
    task = federation.researcher().submit(probe, {"sleep": 5})
    run, container = running_container(federation, task)

    runner.runner.kill()  # SIGKILL: no chance to clean up
    runner.runner.wait()
    container.reload()
    assert container.status == "running"  # the algorithm goes on without the runner
    federation.start_runner(SITE)

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    assert run["attempts"] == 1
    assert states(federation, run) == ["pending", "claimed", "running", "completed"]
    assert output_json(federation, run, "seen.json")["temp_starts_before"] == 0
    assert starts_in_session(federation, task) == 1  # the container started exactly once
    assert f"run {run['id']}: carrying on where it was (its container was created)" in federation.log_of(
        f"{SITE}-runner")


# A small output and log go within the report of the run's end; an output over 64 KiB (the probe writes its input
# into it: random, so it does not shrink) by an upload of its own first, which the registry's absence holds up.
@pytest.mark.parametrize("padding, first_request_held", [
    (0, "report of how run {run} ended, with its output and log"),
    (96 * 1024, "upload of the output of run {run}"),
])
def test_registry_down_during_the_report_then_back(federation, runner, probe, padding, first_request_held):
    padding = base64.b64encode(os.urandom(padding)).decode()
    task = federation.researcher().submit(probe, {"sleep": 1, "padding": padding})
    run, _container = running_container(federation, task)
    federation.stop_registry()
    try:
        wait_until(lambda: "outcome" in run_state(federation, run), "the container ended")
        wait_until(lambda: first_request_held.format(run=run["id"]) + ": registry unreachable"
                   in federation.log_of(f"{SITE}-runner"), "the runner retries")
        # Until the registry confirms, the result stays on disk.
        assert (work_dir(federation) / "runs" / str(run["id"]) / "output.tar.gz").exists()
    finally:
        federation.start_registry()

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    assert run["attempts"] == 1
    assert output_json(federation, run, "seen.json")["environment"]["TASK_ID"] == str(task["id"])
    wait_until(lambda: not (work_dir(federation) / "runs" / str(run["id"])).exists(), "the run's files are removed")


def test_run_that_ended_unreported_before_a_crash_is_reported_after_restart(federation, runner, probe):
    task = federation.researcher().submit(probe, {"sleep": 1})
    run, _container = running_container(federation, task)
    federation.stop_registry()
    try:
        wait_until(lambda: "outcome" in run_state(federation, run), "the container ended")
        runner.runner.kill()
        runner.runner.wait()
    finally:
        federation.start_registry()
    federation.start_runner(SITE)

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    assert run["attempts"] == 1
    assert output_json(federation, run, "seen.json")["environment"]["TASK_ID"] == str(task["id"])
    assert starts_in_session(federation, task) == 1


def test_sigterm_finishes_the_current_run_and_claims_no_more(federation, runner, probe):
    researcher = federation.researcher()
    current = researcher.submit(probe, {"sleep": 3})
    running_container(federation, current)
    waiting = researcher.submit(probe, "{}")

    assert federation.stop_runner(SITE, signal.SIGTERM, timeout=30) == 0

    assert run_of(federation, current)["status"] == "completed"
    assert run_of(federation, waiting)["status"] == "pending"
    federation.start_runner(SITE)
    assert only_run(federation, waiting)["status"] == "completed"


def test_second_signal_exits_at_once_and_the_next_start_carries_on(federation, runner, probe):
    task = federation.researcher().submit(probe, {"sleep": 6})
    run, container = running_container(federation, task)

    runner.runner.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert federation.stop_runner(SITE, signal.SIGTERM, timeout=10) == 1
    container.reload()
    assert container.status == "running"
    federation.start_runner(SITE)

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    assert starts_in_session(federation, task) == 1


def test_once_handles_one_run_then_exits(federation, runner, probe):
    assert federation.stop_runner(SITE) == 0
    researcher = federation.researcher()
    first, second = researcher.submit(probe, "{}"), researcher.submit(probe, "{}")
    command = [PYTHON, str(ROOT / "client" / "runScript.py"), "--config",
               str(federation.sites[SITE].config_path), "--once"]

    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    assert [run_of(federation, task)["status"] for task in (first, second)] == ["completed", "pending"]
    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=60).returncode == 0
    assert run_of(federation, second)["status"] == "completed"
    # Nothing to do: one long-poll (2 s here), then it exits all the same.
    assert subprocess.run(command, cwd=ROOT, capture_output=True, timeout=60).returncode == 0


def test_container_created_but_never_recorded_is_removed_at_start(federation, runner):
    """A runner stopped between creating a container and noting it: that container never started."""
    assert federation.stop_runner(SITE) == 0
    engine = docker.from_env()
    unrecorded = engine.containers.create("pht-base:bookworm", ["sleep", "60"], network_mode="none",
                                          labels=containers.labels_for(SITE, work_dir(federation), 999999, 999999))
    another_runners = engine.containers.create("pht-base:bookworm", ["sleep", "60"], network_mode="none",
                                               labels=containers.labels_for(SITE, "/another/work/dir", 999999, 999999))
    try:
        federation.start_runner(SITE)
        wait_until(lambda: containers.find(engine, unrecorded.id) is None, "the unrecorded container is removed")
        assert containers.find(engine, another_runners.id) is not None  # not this runner's to touch
        assert f"removing container {unrecorded.short_id} of run 999999" in federation.log_of(f"{SITE}-runner")
    finally:
        containers.remove(engine, unrecorded.id)
        containers.remove(engine, another_runners.id)
