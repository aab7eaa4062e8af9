"""A registry upgrades the database of an older release in place when it starts, on SQLite and on
PostgreSQL, in one transaction; a database newer than the registry is refused untouched.

Each older database is made as its release made it: its tables, its schema_version row, and a
finished run in it.
"""

import threading

import pytest
import sqlalchemy as sa

from master import auth, store
from master.app import Settings, create_app

SPARQL_COLUMNS = {"sparql_queries", "sparql_bytes", "sparql_refused"}


def tables_of_version(version):
    """The tables of an older schema version: today's, but for those an upgrade changed since, frozen as they
    were then (a step that changes a table must freeze its old form here too)."""
    frozen = {}
    if version < 3:
        frozen.update(sessions=_sessions_before_version_3, tasks=_tasks_before_version_3)
    if version == 1:
        frozen["runs"] = _runs_of_version_1
    elif version < 6:
        frozen["runs"] = _runs_before_version_6
    tables = sa.MetaData()
    for table in store.metadata.sorted_tables:
        if table.name not in frozen:
            table.to_metadata(tables)
    for freeze in frozen.values():
        freeze(tables)
    if version < 4:
        for name in ("runs", "run_events"):  # their status held 16 characters
            tables.tables[name].c.status.type = sa.String(16)
    return tables


def _runs_before_version_6(tables):
    """Version 1's, with the SPARQL columns of version 2, and the status as wide as today's (from version 4)."""
    runs = _runs_of_version_1(tables)
    for name in sorted(SPARQL_COLUMNS):
        runs.append_column(sa.Column(name, sa.BigInteger))
    runs.c.status.type = sa.String(store.STATUS_LENGTH)


def _runs_of_version_1(tables):
    return sa.Table(
        "runs", tables,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("lease_id", sa.String(64)),
        sa.Column("lease_expires_at", sa.Float),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("exit_code", sa.Integer),
        sa.Column("image_digest", sa.String(256)),
        sa.Column("output_sha256", sa.String(64)),
        sa.Column("output_size", sa.BigInteger),
        sa.Column("log_sha256", sa.String(64)),
        sa.Column("log_size", sa.BigInteger),
        sa.UniqueConstraint("task_id", "site_id"),
        sa.Index("ix_runs_site_status", "site_id", "status"),
        sa.Index("ix_runs_status_lease", "status", "lease_expires_at"),
    )


def _sessions_before_version_3(tables):
    sa.Table(
        "sessions", tables,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("researcher_id", sa.Integer, sa.ForeignKey("researchers.id"), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def _tasks_before_version_3(tables):
    sa.Table(
        "tasks", tables,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False),
        sa.Column("researcher_id", sa.Integer, sa.ForeignKey("researchers.id"), nullable=False),
        sa.Column("image", sa.String(512), nullable=False),
        sa.Column("input", sa.LargeBinary, nullable=False),
        sa.Column("name", sa.String(256)),
        sa.Column("description", sa.Text),
        sa.Column("timeout_seconds", sa.Integer),
        sa.Column("recipients", sa.Text, nullable=False, default=""),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def make_database_of_version(database_url, version):
    """A database of that schema version holding one session with one task, whose run completed;
    returns (the researcher's authorization header, the task id, the session id)."""
    engine = sa.create_engine(database_url)
    tables = tables_of_version(version)
    tables.create_all(engine)
    researcher_token = auth.new_token()
    t = tables.tables
    with engine.begin() as conn:
        def insert(table, **values):
            return conn.execute(t[table].insert().values(**values)).inserted_primary_key[0]

        insert("meta", key="schema_version", value=str(version))
        site_id = insert("sites", name="hospital-a", token_hash=auth.hash_token(auth.new_token()), created_at=1.0)
        researcher_id = insert("researchers", name="alice", token_hash=auth.hash_token(researcher_token), created_at=1.0)
        session_id = insert("sessions", researcher_id=researcher_id, created_at=2.0)
        task_id = insert("tasks", session_id=session_id, researcher_id=researcher_id, image="127.0.0.1:5050/pht/x:1",
                         input=b"{}", recipients="", created_at=2.0)
        insert("runs", task_id=task_id, site_id=site_id, status="completed", attempts=1, lease_id="old-lease",
               updated_at=3.0, exit_code=0, image_digest="sha256:" + "d" * 64)
    engine.dispose()
    return {"Authorization": f"Bearer {researcher_token}"}, task_id, session_id


@pytest.fixture
def version_1_database(database_url):
    """A version-1 database holding one task with a completed run; yields (url, researcher's token, task id)."""
    alice, task_id, _ = make_database_of_version(database_url, 1)
    yield database_url, alice, task_id


@pytest.fixture
def version_2_database(database_url):
    """A version-2 database (before sessions could be closed); yields (url, researcher's token, session id)."""
    alice, _, session_id = make_database_of_version(database_url, 2)
    yield database_url, alice, session_id


@pytest.fixture
def version_3_database(database_url):
    """A version-3 database (run states of up to 16 characters); yields (url, researcher's token)."""
    alice, _, _ = make_database_of_version(database_url, 3)
    yield database_url, alice


def new_task_claimed_at_a_new_site(app, researcher):
    """A site registered in the upgraded database, and a new task's run claimed by it: (site's authorization
    header, the task, the claim)."""
    client = app.test_client()
    site_token = auth.new_token()
    store.create_principal(app.extensions["pht"].engine, store.SITE, "hospital-b", auth.hash_token(site_token))
    site = {"Authorization": f"Bearer {site_token}"}
    task = client.post("/api/tasks", json={"image": "127.0.0.1:5050/pht/x:1", "input": "{}",
                                           "sites": ["hospital-b"]}, headers=researcher).json
    return site, task, client.post("/api/site/claim", json={}, headers=site).json


def state_of(database_url, table="runs"):
    """(schema version, the table's columns) as the database has them now."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar_one()
            columns = {column["name"] for column in sa.inspect(conn).get_columns(table)}
        return int(version), columns
    finally:
        engine.dispose()


def indexed_columns(database_url, table):
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return [index["column_names"] for index in sa.inspect(conn).get_indexes(table)]
    finally:
        engine.dispose()


def test_a_version_1_database_is_upgraded_in_place_and_keeps_its_runs(tmp_path, version_1_database):
    database_url, alice, task_id = version_1_database
    app = create_app(Settings(data_dir=tmp_path / "registry", database_url=database_url))
    try:
        client = app.test_client()
        [run] = client.get(f"/api/tasks/{task_id}", headers=alice).json["runs"]
        assert (run["site"], run["status"], run["exit_code"], run["sparql"]) == ("hospital-a", "completed", 0, None)

        # The new columns take reports at once.
        site, new_task, claimed = new_task_claimed_at_a_new_site(app, alice)
        summary = {"queries": 3, "bytes": 2 ** 40, "refused": 1}
        client.post(f"/api/site/runs/{claimed['id']}/start", headers=site,
                    json={"lease_id": claimed["lease_id"], "image_digest": "sha256:" + "0" * 64})
        finished = client.post(f"/api/site/runs/{claimed['id']}/finish", headers=site,
                               json={"lease_id": claimed["lease_id"], "exit_code": 0, "sparql": summary})
        assert finished.status_code == 200, finished.json
        assert client.get(f"/api/tasks/{new_task['id']}", headers=alice).json["runs"][0]["sparql"] == summary
    finally:
        app.extensions["pht"].engine.dispose()

    version, columns = state_of(database_url)
    assert version == store.SCHEMA_VERSION
    assert SPARQL_COLUMNS <= columns
    store.open_database(database_url).dispose()  # opening an upgraded database again changes nothing
    assert state_of(database_url) == (version, columns)
    assert "closed_at" in state_of(database_url, "sessions")[1]


def test_a_version_3_database_is_upgraded_in_place_and_takes_runs_awaiting_approval(tmp_path, version_3_database):
    database_url, alice = version_3_database
    app = create_app(Settings(data_dir=tmp_path / "registry", database_url=database_url))
    try:
        client = app.test_client()
        site, task, claimed = new_task_claimed_at_a_new_site(app, alice)
        parked = client.post(f"/api/site/runs/{claimed['id']}/park", headers=site, json={
            "lease_id": claimed["lease_id"], "status": "awaiting_approval", "reason": "waits",
            "image_digest": "sha256:" + "0" * 64})
        assert parked.status_code == 204, parked.json
        assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["runs"][0]["status"] == "awaiting_approval"
    finally:
        app.extensions["pht"].engine.dispose()
    assert state_of(database_url)[0] == store.SCHEMA_VERSION


def test_a_version_2_database_is_upgraded_in_place_and_its_sessions_can_be_closed(tmp_path, version_2_database):
    database_url, alice, session_id = version_2_database
    app = create_app(Settings(data_dir=tmp_path / "registry", database_url=database_url))
    try:
        client = app.test_client()
        [session] = client.get("/api/sessions", headers=alice).json["items"]
        assert (session["id"], session["task_count"], session["closed_at"]) == (session_id, 1, None)
        [task] = client.get("/api/tasks", headers=alice).json["items"]
        [run] = task["runs"]
        assert (task["session_id"], run["status"], run["exit_code"]) == (session_id, "completed", 0)

        closed = client.post(f"/api/sessions/{session_id}/close", headers=alice)
        assert closed.status_code == 200, closed.json
        assert closed.json["closed_at"] is not None
        assert store.closed_sessions(app.extensions["pht"].engine, [session_id]) == [session_id]
    finally:
        app.extensions["pht"].engine.dispose()

    version, columns = state_of(database_url, "sessions")
    assert version == store.SCHEMA_VERSION
    assert "closed_at" in columns
    assert ["session_id"] in indexed_columns(database_url, "tasks")
    store.open_database(database_url).dispose()  # opening an upgraded database again changes nothing
    assert state_of(database_url, "sessions") == (version, columns)


def test_a_failed_upgrade_from_version_2_leaves_the_database_as_it_was(version_2_database):
    database_url, _, _ = version_2_database
    # An index made by hand under the name the upgrade gives its own makes the step's second statement fail,
    # after its ALTER TABLE succeeded.
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_tasks_session_id ON tasks (created_at)")
    engine.dispose()
    before = state_of(database_url, "sessions")

    with pytest.raises(RuntimeError, match="from schema version 2 to 3 failed, so it stays at version 2, unchanged"):
        store.open_database(database_url)

    assert state_of(database_url, "sessions") == before
    assert before[0] == 2 and "closed_at" not in before[1]
    assert indexed_columns(database_url, "tasks") == [["created_at"]]


def test_a_failed_upgrade_leaves_the_database_as_it_was(version_1_database):
    database_url, _, _ = version_1_database
    # A column added by hand makes the upgrade's last ALTER TABLE fail, after the first two succeeded.
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE runs ADD COLUMN sparql_refused VARCHAR(8)")
    engine.dispose()
    before = state_of(database_url)

    with pytest.raises(RuntimeError, match="from schema version 1 to 2 failed, so it stays at version 1, unchanged"):
        store.open_database(database_url)

    version, columns = state_of(database_url)
    assert (version, columns) == before
    assert version == 1 and not {"sparql_queries", "sparql_bytes"} & columns
    assert "closed_at" not in state_of(database_url, "sessions")[1]  # nor was any later step taken


def test_a_database_newer_than_the_registry_is_refused_untouched(version_1_database):
    database_url, _, _ = version_1_database
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE meta SET value = :newer WHERE key = 'schema_version'"),
                     {"newer": str(store.SCHEMA_VERSION + 1)})
    engine.dispose()

    with pytest.raises(RuntimeError, match=f"database schema version is {store.SCHEMA_VERSION + 1}, this registry "
                                           f"expects {store.SCHEMA_VERSION}: use a registry release that matches"):
        store.open_database(database_url)

    version, columns = state_of(database_url)
    assert version == store.SCHEMA_VERSION + 1 and not SPARQL_COLUMNS & columns
