"""A site's long-poll costs the registry nothing while it waits: no database query until news for the site."""

import logging
import threading

import pytest
import sqlalchemy as sa

from master import store, wakeup
from master.app import hear_other_replicas
from tests.test_registry_api import alice, claim, hospital, post_task  # noqa: F401 (fixtures)


@pytest.fixture
def queries(app):
    """Every statement the registry sends to its database from now on."""
    sent = []
    engine = app.extensions["pht"].engine
    listener = lambda conn, cursor, statement, *rest: sent.append(statement)  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    yield sent
    sa.event.remove(engine, "before_cursor_execute", listener)


@pytest.fixture
def every_announcement_heard(app):
    """On PostgreSQL, the registry listens to its replicas' news, as `serve` does."""
    stop = threading.Event()
    listener = threading.Thread(target=hear_other_replicas, args=(app, stop), daemon=True)
    listener.start()
    relay = app.extensions["pht"].relay
    assert relay is None or relay.listening.wait(30), "the registry did not start listening"
    yield
    stop.set()
    listener.join(timeout=10)


def looks_for_work(statements):
    return [statement for statement in statements if "FROM runs" in statement]


def test_a_parked_claim_that_hears_no_news_looks_for_work_on_arrival_only(
        app, client, hospital, queries, every_announcement_heard, monkeypatch):  # noqa: F811
    # Were the wait a timer looking in the database, it would look about a hundred times here.
    monkeypatch.setattr(wakeup, "RECHECK_SECONDS", 0.01)
    assert claim(client, hospital, wait_seconds=1).status_code == 204
    assert len(looks_for_work(queries)) == 1


def test_a_parked_claim_wakes_for_a_task_and_takes_it(app, client, alice, hospital, queries,  # noqa: F811
                                                       every_announcement_heard):
    claimed = []
    waiting = threading.Thread(target=lambda: claimed.append(claim(client, hospital, wait_seconds=30)))
    waiting.start()
    # The claim is parked once it has looked once; then the task is posted.
    while not looks_for_work(queries):
        waiting.join(timeout=0.01)
    assert post_task(app.test_client(), alice).status_code == 201
    waiting.join(timeout=30)
    assert claimed[0].status_code == 200 and claimed[0].json["task_id"] == 1


def test_while_the_replicas_news_is_not_heard_a_parked_claim_looks_again(postgres_url, tmp_path, monkeypatch):
    """The safety net: on PostgreSQL, a replica that does not listen (its connection lost) looks every
    RECHECK_SECONDS, so a task posted through another replica still reaches its sites."""
    from master.app import Settings, create_app
    from tests.conftest import _bearer_for
    app = create_app(Settings(data_dir=tmp_path / "deaf", database_url=postgres_url))
    try:
        monkeypatch.setattr(wakeup, "RECHECK_SECONDS", 0.05)
        hospital = _bearer_for(app, "site", "hospital-a")  # noqa: F811
        statements = []
        sa.event.listen(app.extensions["pht"].engine, "before_cursor_execute",
                        lambda conn, cursor, statement, *rest: statements.append(statement))
        assert claim(app.test_client(), hospital, wait_seconds=1).status_code == 204
        assert len(looks_for_work(statements)) > 5
    finally:
        app.extensions["pht"].engine.dispose()


def test_an_idle_sites_renewed_claims_write_its_sighting_only_when_it_is_news(
        client, alice, hospital, queries):  # noqa: F811
    writes = lambda: [s for s in queries if s.lstrip().upper().startswith("UPDATE SITES")]  # noqa: E731
    report = {"runner_version": "pht-runner/0.3", "sparql_ok": True}
    for _ in range(3):
        assert client.post("/api/site/claim", json=report, headers=hospital).status_code == 204
    assert len(writes()) == 1
    # What the site reports changed: written at once.
    assert client.post("/api/site/claim", json={**report, "sparql_ok": False}, headers=hospital).status_code == 204
    assert len(writes()) == 2
    sites = client.get("/api/sites", headers=alice).json["items"]
    assert [(site["name"], site["online"], site["sparql_ok"]) for site in sites] == [("hospital-a", True, False)]


def test_a_sighting_is_written_again_once_the_last_is_half_an_online_window_old():
    from master.sightings import Sightings
    now = [1000.0]
    sightings = Sightings(refresh_seconds=60, clock=lambda: now[0])
    report = ("pht-runner/0.3", True)
    assert sightings.due(7, report)
    sightings.note(7, report, now[0])
    now[0] += 59.9
    assert not sightings.due(7, report)
    assert sightings.due(7, ("pht-runner/0.4", True)) and sightings.due(8, report)
    now[0] += 0.1
    assert sightings.due(7, report)


def test_a_served_registry_writes_the_sightings_of_many_first_claims_in_one_transaction(
        app, client, alice, make_site, queries):  # noqa: F811
    registry = app.extensions["pht"]
    registry.batch_sightings = True  # as write_sightings_periodically has it under `serve`
    sites = [make_site(f"hospital-{letter}") for letter in "abc"]
    writes = lambda: [s for s in queries if s.lstrip().upper().startswith("UPDATE SITES")]  # noqa: E731
    commits = []
    sa.event.listen(registry.engine, "commit", lambda conn: commits.append(conn))
    for site in sites:
        assert claim(client, site).status_code == 204
    assert writes() == [] and commits == []  # noted, not written yet

    # A reader of the sites writes them first, all in one transaction.
    listed = client.get("/api/sites", headers=alice).json["items"]
    assert [(site["name"], site["online"]) for site in listed] == [
        ("hospital-a", True), ("hospital-b", True), ("hospital-c", True)]
    assert len(writes()) == 1 and len(commits) == 1
    registry.write_sightings()  # nothing noted since: nothing written
    assert len(writes()) == 1


def test_sightings_a_database_hiccup_kept_out_are_written_with_the_next(app, client, make_site, monkeypatch):
    registry = app.extensions["pht"]
    registry.batch_sightings = True
    first, second = make_site("hospital-a"), make_site("hospital-b")
    assert claim(client, first).status_code == 204
    def database_away(*_):
        raise sa.exc.OperationalError("UPDATE sites", {}, Exception("the database went away"))
    monkeypatch.setattr(store, "record_sites_seen", database_away)
    with pytest.raises(sa.exc.OperationalError):
        registry.write_sightings()
    monkeypatch.undo()
    assert claim(client, second).status_code == 204
    registry.write_sightings()
    with registry.engine.connect() as conn:
        seen = conn.execute(sa.select(store.sites.c.name).where(store.sites.c.last_seen_at.is_not(None))).scalars()
        assert sorted(seen) == ["hospital-a", "hospital-b"]


def test_a_claim_that_finds_nothing_leaves_no_line_in_the_log_at_info(client, alice, hospital, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="pht.registry")
    assert claim(client, hospital).status_code == 204
    assert [line for line in caplog.messages if "/api/site/claim" in line] == []
    post_task(client, alice)
    assert claim(client, hospital).status_code == 200
    lines = [line for line in caplog.messages if "/api/site/claim" in line]
    assert len(lines) == 1 and lines[0].startswith("POST /api/site/claim -> 200 ")
