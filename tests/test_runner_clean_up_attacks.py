"""A run's folder made ahead (the spare), its slot freed before its container's removal, its relay on its way back
to the pool, its gateway woken at its close: from the side of a hostile registry or algorithm, and of a clean-up
that breaks or a runner killed at each step.

In-process: a SiteRunner with a fake registry (no federation), real mounts (root), real Docker only where the
runner asks the engine. Every wait is on an event, bounded only so that a failure does not hang the suite.
"""

import os
import socket
import threading

import pytest

from client import disk_limits
from client.claim import parse_claim
from client.disk_limits import MIB, DiskSize
from client.relay_pool import RelayPool
from client.run_folder import STATE_FILE, RunFolder, SpareRunFolder, unfinished_runs
from client.runner import SiteRunner, Worker
from client.site_config import SPARQL_GATEWAY_DEFAULTS, SparqlGatewaySettings, parse_site_config
from client.sparql_gateway import CONNECTIONS_PER_RUN, SOCKET_NAME, QueryLog, RunGateway, Upstream
from scripts.federation import free_port
from tests.images import engine_or_fail

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")
SITE = "review-site"
BOUND = 30  # seconds: only so that a failing test ends; nothing is timed


def claim_of(run_id, session_id=3, image="127.0.0.1:5050/pht/x:1"):
    return parse_claim({"id": run_id, "task_id": 5, "session_id": session_id, "image": image,
                        "lease_id": f"lease-{run_id}", "lease_seconds": 30, "timeout_seconds": None,
                        "recipients": []})


class FakeRegistry:
    """What run_until_stopped asks before any claim."""
    url = "http://127.0.0.1:1"
    retry_for_seconds = 0

    def site_name(self):
        return SITE

    def refuse(self, *args):
        raise AssertionError(f"nothing is refused here: {args}")


def site_config(work_dir, **overrides):
    raw = {"registry_url": "http://127.0.0.1:1", "site_name": SITE, "site_token": "t" * 32,
           "sparql_endpoint": f"http://127.0.0.1:{free_port()}/query", "whitelist": [r"127\.0\.0\.1:5050/pht/.*"],
           "require_digest": False, "work_dir": str(work_dir), "max_concurrent_runs": 1,
           "container": {"max_output_bytes": 2 * MIB, "max_output_files": 100, "max_temp_bytes": 2 * MIB,
                         "max_temp_files": 100}}
    raw.update(overrides)
    return parse_site_config(raw)


@pytest.fixture
def work_dir(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    yield folder
    disk_limits.release_all_under(tmp_path)


# --- the spare run folder ------------------------------------------------------------------------------------

@needs_root
def test_a_runner_whose_start_fails_leaves_no_spare_filesystem_mounted(work_dir):
    """The spare is made before the relay image is looked for and the gateway tested, outside the try whose finally
    removes it: a start that fails there (a missing relay base image, say) leaves work_dir/spare-run mounted
    although the runner has stopped (SpareRunFolder.remove: 'nothing is left mounted but runs' and sessions'
    filesystems')."""
    engine = engine_or_fail()
    config = site_config(work_dir, sparql_gateway={"relay_base_image": "pht-review-no-such-base:1"})
    runner = SiteRunner(config, engine, FakeRegistry())
    with pytest.raises(Exception) as raised:
        runner.run_until_stopped(once=True)
    assert "pht-review-no-such-base" in str(raised.value)
    assert disk_limits.mounted_under(work_dir) == [], "the runner stopped, and left a filesystem mounted"


@needs_root
def test_two_claims_racing_for_the_spare_folder_get_it_once(tmp_path):
    size = DiskSize(MIB, 10, 8 * MIB)
    spare = SpareRunFolder(tmp_path / "spare-run", size)
    spare.make()
    start = threading.Barrier(2)
    taken = {}

    def take(run_id):
        start.wait(BOUND)
        taken[run_id] = spare.take(tmp_path / "runs" / str(run_id))

    (tmp_path / "runs").mkdir()
    takers = [threading.Thread(target=take, args=(run_id,)) for run_id in (1, 2)]
    for taker in takers:
        taker.start()
    for taker in takers:
        taker.join(BOUND)
    assert sorted(taken.values()) == [False, True]
    winner = tmp_path / "runs" / str(next(run_id for run_id, won in taken.items() if won))
    assert disk_limits.mounted_under(tmp_path) == [str(winner / "disk")]
    disk_limits.remove_folder(winner)
    assert disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_a_run_claimed_again_gets_a_new_filesystem_not_what_its_earlier_claim_wrote(tmp_path):
    """A registry hands run 7 out again: the stale folder (its filesystem still mounted, a file written) goes, and
    the new claim's folder is a fresh spare holding nothing of it; the spare made meanwhile is not the old one."""
    spare = SpareRunFolder(tmp_path / "spare-run", DiskSize(MIB, 10, 8 * MIB))
    spare.make()
    first = RunFolder.create(tmp_path / "runs", claim_of(7), spare)
    (first.disk / "output").mkdir()
    (first.disk / "output" / "row-level.csv").write_text("patient 1")
    spare.make()
    again = RunFolder.create(tmp_path / "runs", claim_of(7), spare)
    assert again.path == first.path and again.state["claim_key"] != first.state["claim_key"]
    assert os.listdir(again.disk) == [], "the earlier claim's output is visible to the new claim"
    assert disk_limits.mounted_under(tmp_path) == [str(again.disk)]
    again.remove()
    assert disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_a_spare_folder_taken_by_a_killed_runner_before_its_state_is_written_is_removed_as_a_left_over(tmp_path):
    """SIGKILL right after SpareRunFolder.take: runs/<id> holds a mounted filesystem and no state.json."""
    spare = SpareRunFolder(tmp_path / "spare-run", DiskSize(MIB, 10, 8 * MIB))
    spare.make()
    (tmp_path / "runs").mkdir()
    assert spare.take(tmp_path / "runs" / "9")
    assert unfinished_runs(tmp_path / "runs") == []
    assert list((tmp_path / "runs").iterdir()) == [] and disk_limits.mounted_under(tmp_path) == []


def test_the_main_loop_leaves_a_busy_folder_alone_even_without_its_state(tmp_path):
    """A worker removing its folder deletes state.json first: the main loop must not take the rest for a left-over
    of its own (nor set it aside)."""
    runs = tmp_path / "runs"
    folder = RunFolder.create(runs, claim_of(11))
    (folder.path / STATE_FILE).unlink()
    (folder.path / "log.txt").write_text("being removed by its worker")
    assert unfinished_runs(runs, busy={11}) == []
    assert (folder.path / "log.txt").exists()
    assert unfinished_runs(runs) == [] and not folder.path.exists()  # without a worker: a left-over


# --- worker slots --------------------------------------------------------------------------------------------

class FakeHeartbeat:
    def __init__(self):
        self.told_to_stop = threading.Event()

    def stop_work(self, reason):
        self.told_to_stop.set()


def test_a_worker_that_only_cleans_up_holds_no_slot_but_a_claim_of_its_run_waits_for_it(work_dir, monkeypatch):
    """The registry hands out run 21 again while the worker of its earlier claim, its slot freed, still removes
    its folder: the new claim's folder is made only once that worker is done, and by this claim only."""
    runner = SiteRunner(site_config(work_dir, max_concurrent_runs=1), None, FakeRegistry())
    runner.runs_dir.mkdir(parents=True)
    stale_folder = RunFolder.create(runner.runs_dir, claim_of(21))
    heartbeat = FakeHeartbeat()
    seen_by_stale = {}

    def stale_clean_up():
        heartbeat.told_to_stop.wait(BOUND)
        seen_by_stale["claim_key"] = RunFolder.load(stale_folder.path).state["claim_key"]
        stale_folder.remove()  # its folder's removal, the last of its work

    stale = Worker(session_id=3, thread=threading.Thread(target=stale_clean_up), heartbeat=heartbeat)
    runner._workers[21] = stale
    stale.thread.start()
    assert runner.slots_taken() == 1
    runner.free_slot_of(21)
    runner.free_slot_of(99)  # no worker: nothing
    assert runner.slots_taken() == 0 and runner.wait_for_free_slot(timeout=0)

    started = []
    monkeypatch.setattr(runner, "start_worker", lambda folder: started.append(folder))
    runner.take_on(claim_of(21))
    runner._workers.pop(21)  # as the stale worker's finally would
    assert seen_by_stale["claim_key"] == stale_folder.state["claim_key"], "the new claim's folder came first"
    [folder] = started
    assert folder.state["claim_key"] != stale_folder.state["claim_key"]
    assert RunFolder.load(folder.path).state["claim_key"] == folder.state["claim_key"]


# --- the relay on its way back -------------------------------------------------------------------------------

def test_a_returning_that_fails_still_lets_the_take_go_and_other_sessions_never_wait(tmp_path):
    relay_pool = RelayPool(engine_or_fail(), tmp_path / "relays", max_kept=2, return_wait_seconds=BOUND)
    inside, failed = threading.Event(), threading.Event()
    taken = []

    def failing_return():
        with pytest.raises(RuntimeError):
            with relay_pool.returning(1):
                inside.set()
                failed.wait(BOUND)
                raise RuntimeError("the engine broke while removing the container")

    returner = threading.Thread(target=failing_return)
    returner.start()
    inside.wait(BOUND)
    # Another session's take does not wait for session 1's return (it would wait BOUND s and fail below).
    assert relay_pool.take(2, tmp_path / "gateway-2") is None
    assert not failed.is_set()
    taker = threading.Thread(target=lambda: taken.append(relay_pool.take(1, tmp_path / "gateway-1")))
    taker.start()
    failed.set()
    returner.join(BOUND)
    taker.join(BOUND)
    assert taken == [None] and not relay_pool._returning


def test_nested_returnings_of_one_session_are_all_waited_for(tmp_path):
    relay_pool = RelayPool(engine_or_fail(), tmp_path / "relays", max_kept=2, return_wait_seconds=BOUND)
    with relay_pool.returning(1):
        with relay_pool.returning(1):
            pass
        assert relay_pool._returning[1] == 1, "one run of the session still returns"
    assert not relay_pool._returning


# --- the gateway's close --------------------------------------------------------------------------------------

def connect(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    return client


def test_a_closed_gateway_takes_no_connection_even_with_every_slot_held_by_idle_ones(tmp_path):
    """An algorithm holds every connection slot with idle connections and queues one more: the gateway still
    closes (its serving loop woken), and no connection reaches it afterwards."""
    limits = SparqlGatewaySettings(**SPARQL_GATEWAY_DEFAULTS)
    upstream = Upstream(f"http://127.0.0.1:{free_port()}/query", 2)
    gateway = RunGateway(7, 3, tmp_path / "gateway", upstream, limits,
                         QueryLog(tmp_path / "queries.jsonl", 7, 3, True))
    gateway.open()
    socket_path = tmp_path / "gateway" / SOCKET_NAME
    held = [connect(socket_path) for _ in range(CONNECTIONS_PER_RUN + 1)]
    try:
        closer = threading.Thread(target=gateway.close)
        closer.start()
        closer.join(BOUND)
        assert not closer.is_alive(), "the gateway did not close"
        gateway._thread.join(BOUND)
        assert not gateway._thread.is_alive(), "its serving loop goes on"
        assert not socket_path.exists()
        with pytest.raises(OSError):
            connect(socket_path)
        # A connection accepted before the close is not answered as the run any more.
        held[0].sendall(b"GET /sparql?query=ASK%7B%7D HTTP/1.1\r\nHost: x\r\n\r\n")
        held[0].settimeout(BOUND)
        assert held[0].recv(100) == b""
        assert not (tmp_path / "queries.jsonl").exists() or "ASK" not in (tmp_path / "queries.jsonl").read_text()
    finally:
        for client in held:
            client.close()


# --- what a clean-up that breaks leaves --------------------------------------------------------------------------

class EngineThatFailsOneRemoval:
    """docker's low-level API as containers.remove uses it: the algorithm container's first removal fails (the
    engine answers 500), every other removal is done."""

    def __init__(self, failing_id):
        self.failing_id, self.removed, self.failed = failing_id, [], []
        self.api = self

    def remove_container(self, container_id, force=False):
        import docker
        if container_id == self.failing_id and not self.failed:
            self.failed.append(container_id)
            raise docker.errors.APIError("500 Server Error: could not remove container")
        self.removed.append(container_id)


def test_a_removal_that_fails_once_is_tried_again_by_the_clean_up_that_follows(work_dir):
    """work_on calls clean_up; when it raises (the engine failed to remove the container), give_up calls clean_up
    again. remove_containers forgets the container and relay ids (state.json saved) before it removes them, so the
    second clean_up has nothing left to remove: the container and the run's relay (still running, no gateway
    behind it) stay until the runner's next start, while the worker's slot is already free."""
    engine = EngineThatFailsOneRemoval("algorithm-container")
    runner = SiteRunner(site_config(work_dir), engine, FakeRegistry())
    folder = RunFolder.create(work_dir / "runs", claim_of(31))
    folder.record(container_id="algorithm-container", relay_container_id="relay-container", relay_ready=True,
                  outcome={"exit_code": 0, "failure_reason": None})
    with pytest.raises(Exception):
        runner.clean_up(folder)
    runner.clean_up(folder)  # as give_up does
    kept = {relay.container_id for relay in runner.relays._kept.values()}
    assert "algorithm-container" in engine.removed, "the failed removal was not tried again"
    assert "relay-container" in engine.removed or "relay-container" in kept, "the run's relay was forgotten"


@needs_root
def test_a_spare_folder_left_by_a_killed_runner_goes_when_the_runner_starts_again_polling(work_dir):
    """A runner with disk_limits filesystem killed with its spare made; the site switches to polling: the
    spare's filesystem stays mounted for good (size_disks returns before it makes a SpareRunFolder, and
    remove_spare_folder does nothing without one)."""
    SpareRunFolder(work_dir / "spare-run", DiskSize(MIB, 10, 8 * MIB)).make()
    config = site_config(work_dir, container={"disk_limits": "polling"})
    runner = SiteRunner(config, None, FakeRegistry())
    runner.size_disks()
    runner.make_spare_folder()
    runner.remove_spare_folder()
    assert disk_limits.mounted_under(work_dir) == [], "a spare filesystem stays mounted under the work dir"
