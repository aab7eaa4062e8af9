"""How a runner works through its runs: several at once, heartbeats that keep each lease
while a slow pull or a long container goes on, a cancel that kills the container, and the
SPARQL endpoint check it reports with every poll."""

import json
import socket
import threading
import time

import pytest

from scripts.federation import LocalFederation, free_port
from tests.images import (algorithm_containers, engine_or_fail, only_run, output_json, pushed_test_image, run_of,
                          site_status, states, wait_until)

SITE = "hospital-a"
LEASE_SECONDS = 4


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    with LocalFederation(site_names=(SITE,), patients_per_site=5, container_network="none",
                         lease_seconds=LEASE_SECONDS, whitelist=[r"127\.0\.0\.1:[0-9]+/pht/.*"],
                         site_settings={"max_concurrent_runs": 2, "long_poll_seconds": 2}) as federation:
        yield federation


@pytest.fixture(scope="module")
def probe():
    return pushed_test_image("contract-probe")


@pytest.fixture(autouse=True)
def runner_with_its_own_endpoint(federation):
    """The site's runner with its real SPARQL endpoint: given back only to a test after one that took it away,
    not by that test itself (the last one, as it is; stopping a runner waits up to a long-poll)."""
    site = federation.sites[SITE]
    if json.loads(site.config_path.read_text())["sparql_endpoint"] != site.sparql_endpoint:
        federation.stop_runner(SITE)
        federation.configure_site(SITE, sparql_endpoint=site.sparql_endpoint)
        federation.start_runner(SITE)


def site_containers(federation):
    return algorithm_containers(SITE, federation.folder / SITE / "work")


class Tarpit:
    """A port on loopback that accepts connections and never answers: an image registry stuck mid-pull."""

    def __init__(self):
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.connections = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                self.connections.append(self.listener.accept()[0])
            except TimeoutError:
                continue

    def close(self):
        self.closed.set()
        self.thread.join()
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_slow_pull_does_not_hold_up_another_run_or_its_heartbeats(federation, probe):
    tarpit = Tarpit()
    researcher = federation.researcher()
    try:
        stuck = researcher.submit(f"127.0.0.1:{tarpit.port}/pht/never-arrives:1@sha256:{'0' * 64}", "{}")
        wait_until(lambda: tarpit.connections, "the engine starts pulling from the stuck registry")
        # Runs twice as long as a lease: only heartbeats keep it.
        long_run = only_run(federation, researcher.submit(probe, {"sleep": 2 * LEASE_SECONDS}))
        assert long_run["status"] == "completed", long_run["reason"]
        assert long_run["attempts"] == 1
        assert "expired" not in states(federation, long_run)
        # The stuck pull kept its lease all that time too.
        assert run_of(federation, stuck)["status"] == "claimed"
        assert run_of(federation, stuck)["attempts"] == 1
    finally:
        tarpit.close()
    stuck_run = only_run(federation, stuck)
    assert stuck_run["status"] == "failed"
    assert stuck_run["reason"].startswith(f"pulling 127.0.0.1:{tarpit.port}/pht/never-arrives@sha256:{'0' * 64} failed")


def test_runs_go_side_by_side_up_to_the_limit(federation, probe):
    researcher = federation.researcher()
    tasks = [researcher.submit(probe, {"sleep": 3}) for _ in range(3)]
    most_at_once = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(run_of(federation, t)["status"] != "completed" for t in tasks):
        most_at_once = max(most_at_once, len([c for c in site_containers(federation) if c.status == "running"]))
        time.sleep(0.2)
    assert [only_run(federation, task)["status"] for task in tasks] == ["completed"] * 3
    assert most_at_once == 2


def test_cancel_seen_in_a_heartbeat_kills_the_container(federation, probe):
    researcher = federation.researcher()
    task = researcher.submit(probe, {"sleep": 60})
    wait_until(lambda: any(c.status == "running" for c in site_containers(federation)), "the container runs")
    cancelled_at = time.monotonic()
    researcher.cancel(task["id"])

    wait_until(lambda: not site_containers(federation), "the container is gone", timeout=LEASE_SECONDS + 5)
    assert time.monotonic() - cancelled_at < LEASE_SECONDS + 5
    run = only_run(federation, task)
    assert run["status"] == "cancelled"
    assert run["output_sha256"] is None and run["log_sha256"] is None
    wait_until(lambda: not list((federation.folder / SITE / "work" / "runs").iterdir()), "its files are removed")
    # The runner goes on with the next run.
    assert only_run(federation, researcher.submit(probe, "{}"))["status"] == "completed"


def test_run_handed_out_again_after_its_lease_ran_out_runs_anew_once(federation, probe):
    task = federation.researcher().submit(probe, {"sleep": 8})
    wait_until(lambda: any(c.status == "running" for c in site_containers(federation)), "the container runs")
    federation.sites[SITE].runner.kill()  # and it stays away longer than the lease
    federation.sites[SITE].runner.wait()
    wait_until(lambda: run_of(federation, task)["status"] == "pending", "the registry takes the run back")
    federation.start_runner(SITE)

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    assert run["attempts"] == 2
    assert "expired" in states(federation, run)
    # The first container was dropped when the run came back: its result could no longer be reported.
    assert output_json(federation, run, "seen.json")["temp_starts_before"] == 1
    wait_until(lambda: not site_containers(federation), "no container is left")


def test_sparql_endpoint_is_checked_and_reported(federation):
    wait_until(lambda: site_status(federation, SITE)["sparql_ok"] is True, "the registry hears it answers")
    federation.stop_runner(SITE)
    federation.configure_site(SITE, sparql_endpoint=f"http://127.0.0.1:{free_port()}/query")
    federation.start_runner(SITE)
    # An endpoint that does not answer is a warning, and the registry hears of it; the runner goes on.
    wait_until(lambda: site_status(federation, SITE)["sparql_ok"] is False, "the registry hears of it")
    assert federation.sites[SITE].runner.poll() is None
    assert "does not answer" in federation.log_of(f"{SITE}-runner")
