"""A researcher closes a session once its tasks have ended; sites ask which of their sessions are closed.

Through Flask's test client on SQLite and PostgreSQL, then the researcher library and CLI against the same
app served on a loopback port.
"""

import threading

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from master import store
from master.schemas import INT_MAX, MAX_SESSIONS_ASKED
from researcher import Registry, RegistryError
from researcher.__main__ import cli as researcher_cli

IMAGE = "127.0.0.1:5050/pht/patient-count:latest"


@pytest.fixture
def alice(make_researcher):
    return make_researcher("alice")


@pytest.fixture
def bob(make_researcher):
    return make_researcher("bob")


@pytest.fixture
def hospital(make_site):
    return make_site("hospital-a")


def post_task(client, researcher, session_id=None):
    body = {"image": IMAGE, "input": "{}", "sites": ["hospital-a"], "session_id": session_id}
    return client.post("/api/tasks", json={key: value for key, value in body.items() if value is not None},
                       headers=researcher)


def run_to_completion(client, site):
    """Claim the site's next run and report it completed, as its runner would."""
    run = client.post("/api/site/claim", json={}, headers=site).json
    started = client.post(f"/api/site/runs/{run['id']}/start", headers=site,
                          json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64})
    assert started.status_code == 204, started.json
    finished = client.post(f"/api/site/runs/{run['id']}/finish", json={"lease_id": run["lease_id"], "exit_code": 0},
                           headers=site)
    assert finished.status_code == 200, finished.json
    return run


def finished_session(client, researcher, site):
    """A new session whose one task has ended; returns its id."""
    task = post_task(client, researcher).json
    run_to_completion(client, site)
    return task["session_id"]


def close(client, researcher, session_id):
    return client.post(f"/api/sessions/{session_id}/close", headers=researcher)


def ask_closed(client, site, body):
    return client.post("/api/site/sessions/closed", json=body, headers=site)


def sessions_of(client, researcher, **query):
    return client.get("/api/sessions", query_string=query, headers=researcher).json


# --- closing -----------------------------------------------------------------------------------

def test_a_session_whose_tasks_ended_closes_and_closing_again_changes_nothing(client, alice, hospital):
    session_id = finished_session(client, alice, hospital)
    post_task(client, alice, session_id=session_id)
    run_to_completion(client, hospital)

    first = close(client, alice, session_id)
    assert first.status_code == 200, first.json
    assert (first.json["id"], first.json["task_count"]) == (session_id, 2)
    assert first.json["closed_at"] is not None

    again = close(client, alice, session_id)
    assert again.status_code == 200
    assert again.json == first.json  # the first closed_at stays
    assert ask_closed(client, hospital, {"session_ids": [session_id]}).json == {"closed": [session_id]}


@pytest.mark.parametrize("progress", ["pending", "claimed", "running"])
def test_a_session_with_a_task_under_way_is_not_closed_and_the_answer_names_the_fix(client, alice, hospital,
                                                                                    progress):
    task = post_task(client, alice).json
    if progress != "pending":
        run = client.post("/api/site/claim", json={}, headers=hospital).json
        if progress == "running":
            client.post(f"/api/site/runs/{run['id']}/start", json={"lease_id": run["lease_id"],
                                                                    "image_digest": "sha256:" + "a" * 64},
                        headers=hospital)
    assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["runs"][0]["status"] == progress

    refused = close(client, alice, task["session_id"])

    assert refused.status_code == 409
    assert refused.json["message"] == (f"session {task['session_id']} has a task under way: "
                                       f"cancel task {task['id']} or wait for it, then close it")
    assert sessions_of(client, alice)["items"][0]["closed_at"] is None
    assert ask_closed(client, hospital, {"session_ids": [task["session_id"]]}).json == {"closed": []}

    client.post(f"/api/tasks/{task['id']}/cancel", headers=alice)
    assert close(client, alice, task["session_id"]).status_code == 200


def test_every_task_under_way_is_named(client, alice, hospital):
    first = post_task(client, alice).json
    session_id = first["session_id"]
    second = post_task(client, alice, session_id=session_id).json
    run_to_completion(client, hospital)  # the first task ends; one more is added after it, still pending
    third = post_task(client, alice, session_id=session_id).json

    refused = close(client, alice, session_id)

    assert refused.status_code == 409
    assert refused.json["message"] == (f"session {session_id} has tasks under way: cancel tasks "
                                       f"{second['id']}, {third['id']} or wait for them, then close it")


def test_a_session_with_many_tasks_under_way_names_ten_and_counts_the_others(client, alice, hospital):
    first = post_task(client, alice).json
    later = [post_task(client, alice, session_id=first["session_id"]).json["id"] for _ in range(11)]

    message = close(client, alice, first["session_id"]).json["message"]

    named = ", ".join(str(task_id) for task_id in [first["id"], *later[:9]])
    assert message == (f"session {first['session_id']} has tasks under way: cancel tasks {named} and 2 more "
                       "or wait for them, then close it")


def test_a_closed_session_takes_no_more_tasks(client, alice, hospital):
    session_id = finished_session(client, alice, hospital)
    close(client, alice, session_id)

    refused = post_task(client, alice, session_id=session_id)

    assert refused.status_code == 409
    assert refused.json["message"] == f"session {session_id} is closed; omit session_id to start a new one"
    assert client.get("/api/tasks", headers=alice).json["total"] == 1  # nothing half-stored
    assert client.post("/api/site/claim", json={}, headers=hospital).status_code == 204
    assert post_task(client, alice).status_code == 201  # a new session


def test_another_researchers_session_cannot_be_closed_or_seen(client, alice, bob, hospital):
    session_id = finished_session(client, alice, hospital)

    for researcher, unknown in ((bob, session_id), (alice, session_id + 1), (alice, INT_MAX), (alice, 2 ** 70)):
        answer = close(client, researcher, unknown)
        assert answer.status_code == 404, (unknown, answer.json)
    assert close(client, bob, session_id).json["message"] == f"session {session_id} does not exist"
    assert sessions_of(client, bob) == {"items": [], "total": 0, "page": 1, "per_page": 50}
    assert sessions_of(client, alice)["items"][0]["closed_at"] is None
    assert post_task(client, bob, session_id=session_id).status_code == 404


def test_the_session_endpoints_need_a_researchers_token(client, alice, hospital):
    session_id = finished_session(client, alice, hospital)
    assert client.post(f"/api/sessions/{session_id}/close").status_code == 401
    assert client.post(f"/api/sessions/{session_id}/close", headers={"Authorization": "Bearer x"}).status_code == 401
    assert close(client, hospital, session_id).status_code == 403
    assert client.get("/api/sessions", headers=hospital).status_code == 403
    assert sessions_of(client, alice)["items"][0]["closed_at"] is None


def test_sessions_are_listed_oldest_first_a_page_at_a_time(client, alice, bob, hospital):
    first = finished_session(client, alice, hospital)
    post_task(client, alice, session_id=first)
    run_to_completion(client, hospital)
    second = finished_session(client, alice, hospital)
    finished_session(client, bob, hospital)
    third = post_task(client, alice).json["session_id"]
    close(client, alice, second)

    listed = sessions_of(client, alice)
    assert (listed["total"], listed["page"], listed["per_page"]) == (3, 1, 50)
    assert [(s["id"], s["task_count"], s["closed_at"] is not None) for s in listed["items"]] == [
        (first, 2, False), (second, 1, True), (third, 1, False)]
    assert all(s["created_at"].endswith("+00:00") for s in listed["items"])
    assert [s["id"] for s in sessions_of(client, alice, page=2, per_page=2)["items"]] == [third]
    assert client.get("/api/sessions", query_string={"per_page": 201}, headers=alice).status_code == 422


def researcher_id_of(engine, name):
    with engine.connect() as conn:
        return conn.execute(sa.select(store.researchers.c.id).where(store.researchers.c.name == name)).scalar_one()


def at_once(*actions):
    """Run the actions in threads released together; returns each one's outcome: "done" or "conflict"."""
    all_ready = threading.Barrier(len(actions))
    outcomes = [None] * len(actions)

    def attempt(index, action):
        all_ready.wait(timeout=30)
        try:
            action()
            outcomes[index] = "done"
        except store.Conflict:
            outcomes[index] = "conflict"

    threads = [threading.Thread(target=attempt, args=(index, action)) for index, action in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def test_a_task_added_while_the_session_closes_either_stops_the_close_or_is_refused(app, alice, hospital):
    """Both at once, many times: never a closed session with a task added after its close."""
    engine = app.extensions["pht"].engine
    researcher_id = researcher_id_of(engine, "alice")
    for _ in range(15):
        task_id, _ = store.create_task(engine, researcher_id, IMAGE, b"{}", ["hospital-a"])
        session_id = store.get_task(engine, task_id, researcher_id)["session_id"]
        store.cancel_task(engine, task_id, researcher_id)

        close_outcome, add_outcome = at_once(
            lambda: store.close_session(engine, session_id, researcher_id),
            lambda: store.create_task(engine, researcher_id, IMAGE, b"{}", ["hospital-a"], session_id=session_id))

        tasks, _ = store.list_tasks(engine, researcher_id, session_id=session_id)
        closed = store.closed_sessions(engine, [session_id]) == [session_id]
        assert (close_outcome, add_outcome, closed, len(tasks)) in (
            ("done", "conflict", True, 1), ("conflict", "done", False, 2)), (close_outcome, add_outcome)
        for task in tasks:
            store.cancel_task(engine, task["id"], researcher_id)


def test_tasks_added_to_one_session_at_once_are_all_stored(app, alice, hospital):
    engine = app.extensions["pht"].engine
    researcher_id = researcher_id_of(engine, "alice")
    task_id, _ = store.create_task(engine, researcher_id, IMAGE, b"{}", ["hospital-a"])
    session_id = store.get_task(engine, task_id, researcher_id)["session_id"]

    outcomes = at_once(*[lambda: store.create_task(engine, researcher_id, IMAGE, b"{}", ["hospital-a"],
                                                   session_id=session_id)] * 6)

    assert outcomes == ["done"] * 6
    assert store.list_tasks(engine, researcher_id, session_id=session_id)[1] == 7


# --- what a site asks --------------------------------------------------------------------------

def test_a_site_learns_which_of_its_sessions_are_closed_or_unknown(client, alice, bob, hospital):
    closed = finished_session(client, alice, hospital)
    close(client, alice, closed)
    still_open = finished_session(client, alice, hospital)
    others_closed = finished_session(client, bob, hospital)
    close(client, bob, others_closed)
    never_made = others_closed + 100

    answer = ask_closed(client, hospital, {"session_ids": [never_made, still_open, closed, closed, others_closed]})

    assert answer.status_code == 200
    assert answer.json == {"closed": sorted([closed, others_closed, never_made])}
    assert ask_closed(client, hospital, {"session_ids": [still_open]}).json == {"closed": []}
    assert ask_closed(client, hospital, {"session_ids": [float(closed)]}).json == {"closed": [closed]}  # JSON's 3.0


def test_a_site_may_ask_about_a_thousand_sessions_at_once(client, hospital):
    asked = list(range(INT_MAX - MAX_SESSIONS_ASKED + 1, INT_MAX + 1))
    answer = ask_closed(client, hospital, {"session_ids": asked})
    assert answer.status_code == 200
    assert answer.json == {"closed": asked}


@pytest.mark.parametrize("body, complaint", [
    ({"session_ids": ["1"]}, "Not a valid integer"),
    ({"session_ids": ["one"]}, "Not a valid integer"),
    ({"session_ids": [1.5]}, "Not a valid integer"),
    ({"session_ids": [True]}, "Not a valid integer"),
    ({"session_ids": [None]}, "may not be null"),
    ({"session_ids": [[1]]}, "Not a valid integer"),
    ({"session_ids": [[[1, 2]], {"id": 1}]}, "Not a valid integer"),
    ({"session_ids": [-1]}, "greater than or equal to 1"),
    ({"session_ids": [0]}, "greater than or equal to 1"),
    ({"session_ids": [INT_MAX + 1]}, "less than or equal to 2147483647"),
    ({"session_ids": [2 ** 70]}, "less than or equal to 2147483647"),
    ({"session_ids": []}, "give 1 to 1000 session ids"),
    ({"session_ids": list(range(1, MAX_SESSIONS_ASKED + 2))}, "give 1 to 1000 session ids"),
    ({"session_ids": list(range(1, 10_002))}, "give 1 to 1000 session ids"),
    ({"session_ids": "1,2"}, "Not a valid list"),
    ({"session_ids": {"1": True}}, "Not a valid list"),
    ({"session_ids": None}, "may not be null"),
    ({}, "Missing data for required field"),
    ({"session_ids": [1], "and": "more"}, "Unknown field"),
    ([1, 2], "Invalid input type"),
    ("1", "Invalid input type"),
])
def test_a_site_asking_with_garbage_gets_422_naming_what_is_wrong(client, alice, hospital, body, complaint):
    session_id = finished_session(client, alice, hospital)
    answer = ask_closed(client, hospital, body)
    assert answer.status_code == 422
    assert complaint in answer.get_data(as_text=True)
    assert ask_closed(client, hospital, {"session_ids": [session_id]}).json == {"closed": []}  # nothing closed


def test_a_site_asking_with_a_body_that_is_not_json_gets_a_client_error(client, hospital):
    for body in ("{not json", "", "\x00"):
        answer = client.post("/api/site/sessions/closed", data=body,
                             headers={**hospital, "Content-Type": "application/json"})
        assert 400 <= answer.status_code < 500, (body, answer.status_code)


def test_only_a_site_may_ask_which_sessions_are_closed(client, alice, make_site, hospital):
    body = {"session_ids": [1]}
    assert client.post("/api/site/sessions/closed", json=body).status_code == 401
    assert client.post("/api/site/sessions/closed", json=body,
                       headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert ask_closed(client, alice, body).status_code == 403


def test_the_answer_to_a_site_takes_one_query(app):
    engine = app.extensions["pht"].engine
    statements = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731 (conn, cursor, statement, ...)
    sa.event.listen(engine, "before_cursor_execute", listener)
    try:
        store.closed_sessions(engine, list(range(1, MAX_SESSIONS_ASKED + 1)))
    finally:
        sa.event.remove(engine, "before_cursor_execute", listener)
    assert len(statements) == 1, statements


# --- the researcher library and CLI ------------------------------------------------------------

@pytest.fixture
def alices_token(make_researcher):
    return make_researcher("alice")["Authorization"].removeprefix("Bearer ")


def test_the_library_lists_and_closes_sessions(served_app, alices_token, client, hospital):
    registry = Registry(served_app, alices_token)
    task = registry.submit(IMAGE, {}, sites=["hospital-a"], pin_digest=False)
    session_id = task["session_id"]

    with pytest.raises(RegistryError, match=f"409 session {session_id} has a task under way: cancel task "
                                            f"{task['id']} or wait for it"):
        registry.close_session(session_id)
    run_to_completion(client, hospital)
    closed = registry.close_session(session_id)
    assert (closed["id"], closed["task_count"]) == (session_id, 1) and closed["closed_at"]
    assert registry.close_session(session_id) == closed
    assert list(registry.sessions()) == [closed]

    with pytest.raises(RegistryError, match=f"409 session {session_id} is closed; omit session_id"):
        registry.submit(IMAGE, {}, sites=["hospital-a"], session_id=session_id, pin_digest=False)
    with pytest.raises(RegistryError, match=f"404 session {session_id + 1} does not exist"):
        registry.close_session(session_id + 1)


def test_the_cli_lists_and_closes_sessions(served_app, alices_token, client, hospital, tmp_path):
    def cli(*args):
        env = {"PHT_REGISTRY_URL": served_app, "PHT_TOKEN": alices_token, "PHT_CONFIG": str(tmp_path / "none.toml"),
               "PHT_IDENTITY": None}
        return CliRunner().invoke(researcher_cli, list(args), env=env, catch_exceptions=False)

    task = Registry(served_app, alices_token).submit(IMAGE, {}, sites=["hospital-a"], pin_digest=False)
    session_id = task["session_id"]

    refused = cli("close-session", str(session_id))
    assert refused.exit_code == 1
    assert refused.stderr == (f"error: registry answered 409 session {session_id} has a task under way: cancel task "
                              f"{task['id']} or wait for it, then close it\n")

    run_to_completion(client, hospital)
    done = cli("close-session", str(session_id))
    assert done.exit_code == 0, done.stderr
    assert done.stdout.startswith(f"session {session_id} closed; each site removes its /temp/")

    table = cli("sessions")
    assert table.exit_code == 0, table.stderr
    [row] = [line.split() for line in table.stdout.splitlines() if line.split()[:1] == [str(session_id)]]
    assert row[1] == "1" and row[-1] != "open"
    assert cli("sessions", "--json").stdout.count('"closed_at": "') == 1
    assert cli("close-session", str(session_id), "--json").exit_code == 0

    unknown = cli("close-session", "999")
    assert (unknown.exit_code, unknown.stderr) == (1, "error: registry answered 404 session 999 does not exist\n")
