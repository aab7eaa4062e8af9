"""Replicas of the registry on one PostgreSQL database, each with its own data folder, as on two machines:
news posted through one wakes the long-polls waiting on the other (master/wakeup.py's PostgresRelay).
"""

import concurrent.futures
import threading

import pytest
import sqlalchemy as sa

from master import store, wakeup
from master.app import Settings, create_app, hear_other_replicas
from master.wakeup import MAX_PAYLOAD_CHARS, keys_from, payloads
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


@pytest.fixture
def only_news_wakes(monkeypatch):
    """The safety net (looking again every RECHECK_SECONDS) out of reach, and an event set each time a waiting
    request looks in the database: (looked for work, looked at a task)."""
    monkeypatch.setattr(wakeup, "RECHECK_SECONDS", 600)
    events = []
    for name in ("claim_next_run", "get_task"):
        looked, original = threading.Event(), getattr(store, name)

        def looking(*args, looked=looked, original=original, **kwargs):
            found = original(*args, **kwargs)
            looked.set()
            return found
        monkeypatch.setattr(store, name, looking)
        events.append(looked)
    return events


def test_a_researcher_waiting_on_one_replica_hears_a_run_end_through_the_other(replicas, only_news_wakes):
    first, second = replicas
    _, looked_at_task = only_news_wakes
    alice, hospital = _bearer_for(first, "researcher", "alice"), _bearer_for(first, "site", "hospital-a")
    task_id = post_task(first.test_client(), alice).json["id"]
    run = claim(first.test_client(), hospital).json

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        looked_at_task.clear()
        waiting = pool.submit(second.test_client().get, f"/api/tasks/{task_id}", query_string={"wait_seconds": 60},
                              headers=alice)
        assert looked_at_task.wait(30), "the wait did not look at the task"  # still active: it waits now
        finish(first.test_client(), hospital, run)
        # Without news from the other replica this wait answers after 60 s, with the task still active.
        assert waiting.result(timeout=90).json["status"] == "completed"


def wait_for_work_posted_through(first, second, looked_for_work):
    """A site long-polls the second replica; a task is posted through the first. Returns (task id, the claim)."""
    alice, hospital = _bearer_for(first, "researcher", "alice"), _bearer_for(first, "site", "hospital-a")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        looked_for_work.clear()
        waiting = pool.submit(claim, second.test_client(), hospital, 60)
        assert looked_for_work.wait(30), "the claim did not look for work"  # found none: it waits now
        task_id = post_task(first.test_client(), alice).json["id"]
        return task_id, waiting.result(timeout=90)


def test_a_site_waiting_on_one_replica_gets_work_posted_through_the_other(replicas, only_news_wakes):
    task_id, answer = wait_for_work_posted_through(*replicas, only_news_wakes[0])
    assert answer.status_code == 200 and answer.json["task_id"] == task_id


@pytest.mark.parametrize("payload", ["x ²", "x " + "9" * 5000, "", "0123456789ab 1,,2", "0123456789ab -1"])
def test_a_notification_no_replica_sends_is_ignored_and_the_relay_goes_on(replicas, only_news_wakes, payload):
    """Attack: anyone who may connect to the database may NOTIFY on the registry's channels. A payload of
    another shape once ended the listener of every replica, for good."""
    first, second = replicas
    with first.extensions["pht"].engine.begin() as conn:
        for channel in ("pht_work_for_sites", "pht_ended_tasks"):
            conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})
    task_id, answer = wait_for_work_posted_through(first, second, only_news_wakes[0])
    assert answer.status_code == 200 and answer.json["task_id"] == task_id


def test_a_payload_is_read_only_in_the_shape_a_replica_sends():
    assert keys_from("0123456789ab 1,22,333", "ffffffffffff") == [1, 22, 333]
    assert keys_from("0123456789ab 1,22,333", "0123456789ab") == []  # its own news: heard when announced
    for hostile in ("0123456789ab ²", "0123456789ab 1,", "0123456789ab 1 2", "0123456789ab\n1", "0123456789AB 1",
                    "0123456789ab " + "9" * 11, "0123456789ab 0", "0123456789ab 2147483648"):
        assert keys_from(hostile, "ffffffffffff") == [], hostile


def test_notification_payloads_name_every_key_and_stay_under_postgres_limit():
    keys = list(range(10 ** 6, 10 ** 6 + 5000))
    sent = list(payloads("replica1", keys))
    assert len(sent) > 1 and all(len(payload) <= MAX_PAYLOAD_CHARS for payload in sent)
    assert [int(key) for payload in sent for key in payload.removeprefix("replica1 ").split(",")] == keys
    assert list(payloads("replica1", [])) == []
