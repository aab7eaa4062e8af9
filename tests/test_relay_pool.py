"""A run's SPARQL relay is kept for the next run of its session at the site, and for nothing else.

One site (network none, so every run goes through its relay and gateway), the sparql-probe image as the
algorithm. What an algorithm in one run of a session leaves in the relay's network namespace must not reach
the session's next run; another session never gets the relay; and a kept relay goes when its session does,
when the runner restarts, or is replaced when it died.
"""

import json
import signal
import threading

import docker
import pytest

from client import containers
from client.relay_pool import KEEP_SECONDS, RelayPool
from scripts.federation import LocalFederation
from tests.images import (BASE_IMAGE, engine_or_fail, netns_of_container, only_run, output_json, pushed_test_image,
                          relay_ids, wait_until, wait_until_cleaned_up)

SITE = "hospital-a"
ASK = {"name": "ask", "do": "http", "params": {"query": "ASK { ?s ?p ?o }"},
       "accept": "application/sparql-results+json"}
LINGER_PORT = 7777
LINGER_NAME = "pht-left-behind"


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    # A short lease: a run the registry gives to the parked claim of a runner the test stopped comes back soon.
    with LocalFederation(site_names=(SITE,), patients_per_site=10, container_network="none", lease_seconds=6,
                         site_settings={"max_concurrent_runs": 2, "long_poll_seconds": 2,
                                        "poll_interval_seconds": 0.2}) as federation:
        yield federation


@pytest.fixture(scope="module")
def probe():
    return pushed_test_image("sparql-probe")


def work_dir(federation):
    return federation.folder / SITE / "work"


def relays(federation):
    return relay_ids(SITE, work_dir(federation))


def run_probe(federation, probe, steps, session_id=None):
    """Post the probe with these steps (and an ASK through the gateway first); returns (its task, its report)."""
    task = federation.researcher().submit(probe, {"steps": [ASK, {"name": "netns", "do": "netns"}, *steps]},
                                          sites=[SITE], session_id=session_id)
    run = only_run(federation, task, timeout_seconds=90)
    assert run["status"] == "completed", run["reason"]
    report = output_json(federation, run, "report.json")["steps"]
    assert report["ask"]["status"] == 200 and report["ask"]["json"]["boolean"] is True, report["ask"]
    return task, report


def settled(federation):
    wait_until_cleaned_up(work_dir(federation))


def kept_relay_of(federation, netns):
    """The one running relay whose network namespace is netns."""
    found = [relay_id for relay_id in relays(federation) if netns_of_container(relay_id) == netns]
    assert len(found) == 1, (netns, found)
    return found[0]


# --- the pool's own rules, with relay containers created (not started) in a work dir of the test's own --------

class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


@pytest.fixture
def pool(tmp_path):
    engine = engine_or_fail()
    image = containers.relay_image(engine, BASE_IMAGE)
    clock = Clock()
    made = []

    def relay():
        """A relay container and its socket folder, as a run that ended leaves them."""
        folder = tmp_path / "runs" / str(len(made)) / "gateway"
        folder.mkdir(parents=True)
        container = containers.create_relay(engine, image, folder, containers.labels_for(SITE, tmp_path, 1, 1))
        made.append(container.id)
        return container.id, folder

    relay_pool = RelayPool(engine, tmp_path / "relays", max_kept=2, clock=clock)
    yield relay_pool, relay, clock
    relay_pool.close()
    for container_id in made:
        containers.remove(engine, container_id)


def exists(container_id):
    return containers.find(docker.from_env(), container_id) is not None


def test_a_kept_relay_is_removed_once_unused_for_keep_seconds(pool):
    relay_pool, relay, clock = pool
    kept, folder = relay()
    relay_pool.keep(5, kept, folder)
    assert not folder.exists(), "the socket folder did not move with the kept relay"
    clock.now += KEEP_SECONDS - 1
    relay_pool.remove_unused()
    assert exists(kept)
    clock.now += 2
    relay_pool.remove_unused()
    assert not exists(kept)
    assert not any((relay_pool.folder).iterdir()), "the kept relay's socket folder was left behind"


def test_the_least_recently_kept_relay_goes_beyond_max_kept(pool):
    relay_pool, relay, clock = pool
    ids = []
    for session_id in (1, 2, 3):
        container_id, folder = relay()
        relay_pool.keep(session_id, container_id, folder)
        ids.append(container_id)
        clock.now += 1
    assert [exists(container_id) for container_id in ids] == [False, True, True]


def test_one_relay_is_kept_per_session_and_a_removed_sessions_goes(pool):
    relay_pool, relay, _clock = pool
    older, folder = relay()
    relay_pool.keep(1, older, folder)
    newer, folder = relay()
    relay_pool.keep(1, newer, folder)
    assert (exists(older), exists(newer)) == (False, True)
    relay_pool.remove_unused(ended_sessions={1})
    assert not exists(newer)


def test_a_relay_that_is_not_running_is_not_handed_out(pool, tmp_path):
    relay_pool, relay, _clock = pool
    created_only, folder = relay()  # never started: a relay that stopped looks the same to the pool
    relay_pool.keep(1, created_only, folder)
    assert relay_pool.take(2, tmp_path / "other-gateway") is None, "another session's run got the relay"
    assert relay_pool.take(1, tmp_path / "gateway") is None
    assert not exists(created_only)
    assert not (tmp_path / "gateway").exists()


def test_a_take_waits_for_the_relay_its_session_is_returning(pool, tmp_path):
    relay_pool, relay, _clock = pool
    container_id, folder = relay()
    docker.from_env().containers.get(container_id).start()  # a run's relay runs
    inside, go = threading.Event(), threading.Event()

    def returning_run():
        with relay_pool.returning(1):
            inside.set()
            go.wait(30)
            relay_pool.keep(1, container_id, folder)

    returner = threading.Thread(target=returning_run)
    returner.start()
    inside.wait(30)
    taken = []
    taker = threading.Thread(target=lambda: taken.append(relay_pool.take(1, tmp_path / "gateway")))
    taker.start()
    taker.join(0.2)  # a take that does not wait has long returned (None: nothing is kept yet) by now
    assert taker.is_alive(), f"the take did not wait for the relay on its way back: {taken}"
    go.set()
    returner.join(30)
    taker.join(30)
    assert taken == [container_id]


def test_a_take_waits_no_longer_than_the_return_or_its_bound(tmp_path):
    relay_pool = RelayPool(engine_or_fail(), tmp_path / "relays", max_kept=2, return_wait_seconds=0.3)
    with relay_pool.returning(1):
        pass  # its relay was removed, not kept
    assert relay_pool.take(1, tmp_path / "gateway") is None
    with relay_pool.returning(2):  # a removal that does not end (the engine hangs, say): the take gives up
        assert relay_pool.take(2, tmp_path / "gateway") is None


# --- a site's runs ---------------------------------------------------------------------------------------------

def test_a_sessions_next_run_joins_its_kept_relay_and_finds_nothing_the_run_before_left(federation, probe):
    first, before = run_probe(federation, probe, [{"name": "linger", "do": "linger", "port": LINGER_PORT,
                                                   "unix_name": LINGER_NAME}])
    assert f"127.0.0.1:{LINGER_PORT}" in before["linger"]["listening"], before["linger"]
    assert LINGER_NAME in before["linger"]["abstract_unix"], before["linger"]
    kept = kept_relay_of(federation, before["netns"])

    _second, after = run_probe(federation, probe, [{"name": "left", "do": "tcp",
                                                    "addresses": [f"127.0.0.1:{LINGER_PORT}"]},
                                                   {"name": "net", "do": "net"}],
                               session_id=first["session_id"])
    assert after["netns"] == before["netns"], "the session's second run did not join the relay its first run had"
    assert after["left"][f"127.0.0.1:{LINGER_PORT}"].startswith("failed"), after["left"]
    assert after["net"]["listening"] == ["127.0.0.1:8890"], after["net"]  # the relay's port, nothing else
    assert LINGER_NAME not in after["net"]["abstract_unix"], after["net"]
    assert kept in relays(federation), "the kept relay was removed, not kept again for the session"


def test_another_session_never_gets_a_kept_relay(federation, probe):
    first, one = run_probe(federation, probe, [])
    other, two = run_probe(federation, probe, [])
    assert other["session_id"] != first["session_id"]
    assert one["netns"] != two["netns"], "a run of another session joined a relay a session had kept"
    _again, three = run_probe(federation, probe, [], session_id=first["session_id"])
    assert three["netns"] == one["netns"], "the session's relay was not kept while another session's run ran"


def test_a_kept_relay_that_died_is_replaced_and_the_run_still_reaches_its_data(federation, probe):
    first, before = run_probe(federation, probe, [])
    died = kept_relay_of(federation, before["netns"])
    docker.from_env().containers.get(died).kill()
    _second, after = run_probe(federation, probe, [], session_id=first["session_id"])
    # Compared by container: the kernel may give the new namespace the number of the one that went.
    assert kept_relay_of(federation, after["netns"]) != died
    assert died not in relays(federation), "the relay that died was left behind"


def test_a_closed_sessions_relay_is_removed(federation, probe):
    first, report = run_probe(federation, probe, [])
    kept = kept_relay_of(federation, report["netns"])
    federation.researcher().close_session(first["session_id"])
    wait_until(lambda: kept not in relays(federation), "the closed session's relay is removed")


def test_at_most_max_concurrent_runs_relays_are_kept(federation, probe):
    for _ in range(3):
        run_probe(federation, probe, [])
    settled(federation)
    assert len(relays(federation)) <= 2, "more relays kept than max_concurrent_runs (2)"


def test_a_restarted_runner_removes_the_relays_the_one_before_kept(federation, probe):
    run_probe(federation, probe, [])
    settled(federation)
    kept = set(relays(federation))
    assert kept
    federation.stop_runner(SITE, signal.SIGKILL)
    assert set(relays(federation)) == kept, "a killed runner removed nothing: its relays are still there"
    federation.start_runner(SITE)
    wait_until(lambda: not kept & set(relays(federation)), "the restarted runner removes the relays kept before")
    left = work_dir(federation) / "relays"
    assert not left.exists() or not any(left.iterdir()), json.dumps([path.name for path in left.iterdir()])


def test_a_stopping_runner_removes_the_relays_it_kept(federation, probe):
    run_probe(federation, probe, [])
    settled(federation)
    assert relays(federation)
    assert federation.stop_runner(SITE) == 0
    assert not relays(federation), "the runner stopped and left relays behind"
    federation.start_runner(SITE)  # for whatever runs after
