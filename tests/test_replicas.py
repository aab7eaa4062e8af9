"""Replicas of the registry on one PostgreSQL database, each with its own data folder, as on two machines:
news posted through one wakes the long-polls waiting on the other (master/wakeup.py's PostgresRelay).
"""

import concurrent.futures
import threading

import pytest

from master import site_api, store
from master.app import Settings, create_app, hear_other_replicas
from master.wakeup import MAX_PAYLOAD_CHARS, payloads
from tests.conftest import _bearer_for
from tests.test_registry_api import claim, finish, post_task


@pytest.fixture
def replicas(tmp_path, postgres_url):
    """Two registries on the database, each hearing the other."""
    apps = [create_app(Settings(data_dir=tmp_path / name, database_url=postgres_url)) for name in ("first", "second")]
    stop = threading.Event()
    listeners = [threading.Thread(target=hear_other_replicas, args=(app, stop), daemon=True) for app in apps]
    for listener in listeners:
        listener.start()
    for app in apps:
        assert app.extensions["pht"].relay.listening.wait(30), "a replica did not start listening"
    yield apps
    stop.set()
    for listener in listeners:
        listener.join(timeout=10)
    for app in apps:
        app.extensions["pht"].engine.dispose()


def test_a_researcher_waiting_on_one_replica_hears_a_run_end_through_the_other(replicas):
    first, second = replicas
    alice, hospital = _bearer_for(first, "researcher", "alice"), _bearer_for(first, "site", "hospital-a")
    task_id = post_task(first.test_client(), alice).json["id"]
    run = claim(first.test_client(), hospital).json

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Without news from the other replica this wait answers only after 60 s, with the task still active.
        waiting = pool.submit(second.test_client().get, f"/api/tasks/{task_id}", query_string={"wait_seconds": 60},
                              headers=alice)
        finish(first.test_client(), hospital, run)
        assert waiting.result(timeout=90).json["status"] == "completed"


def test_a_site_waiting_on_one_replica_gets_work_posted_through_the_other(replicas, monkeypatch):
    first, second = replicas
    monkeypatch.setattr(site_api, "RECHECK_SECONDS", 600)  # the safety net out of reach: only news wakes it
    alice, hospital = _bearer_for(first, "researcher", "alice"), _bearer_for(first, "site", "hospital-a")

    looked = threading.Event()
    claim_next_run = store.claim_next_run

    def claim_next_run_and_tell(*args, **kwargs):
        found = claim_next_run(*args, **kwargs)
        looked.set()
        return found
    monkeypatch.setattr(store, "claim_next_run", claim_next_run_and_tell)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(claim, second.test_client(), hospital, 60)
        assert looked.wait(30), "the claim did not look for work"  # found none: it waits now
        task_id = post_task(first.test_client(), alice).json["id"]
        answer = waiting.result(timeout=90)
    assert answer.status_code == 200 and answer.json["task_id"] == task_id


def test_notification_payloads_name_every_key_and_stay_under_postgres_limit():
    keys = list(range(10 ** 6, 10 ** 6 + 5000))
    sent = list(payloads("replica1", keys))
    assert len(sent) > 1 and all(len(payload) <= MAX_PAYLOAD_CHARS for payload in sent)
    assert [int(key) for payload in sent for key in payload.removeprefix("replica1 ").split(",")] == keys
    assert list(payloads("replica1", [])) == []
