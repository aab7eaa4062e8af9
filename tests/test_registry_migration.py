"""A registry upgrades the database of an older release in place when it starts, on SQLite and on
PostgreSQL, in one transaction; a database newer than the registry is refused untouched.

The version-1 database is made as release 1 made it: its tables, its schema_version row, and a
finished run in it.
"""

import threading

import pytest
import sqlalchemy as sa

from master import auth, store
from master.app import Settings, create_app

SPARQL_COLUMNS = {"sparql_queries", "sparql_bytes", "sparql_refused"}


def version_1_tables():
    """The tables of schema version 1. `runs` is frozen as version 1 defined it; no upgrade has changed
    the others yet, so they are today's (a step that changes one must freeze its old form here too)."""
    tables = sa.MetaData()
    for table in store.metadata.sorted_tables:
        if table.name != "runs":
            table.to_metadata(tables)
    sa.Table(
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
    return tables


@pytest.fixture
def version_1_database(database_url):
    """A version-1 database holding one task with a completed run; yields (url, researcher's token, task id)."""
    engine = sa.create_engine(database_url)
    tables = version_1_tables()
    tables.create_all(engine)
    researcher_token = auth.new_token()
    t = tables.tables
    with engine.begin() as conn:
        def insert(table, **values):
            return conn.execute(t[table].insert().values(**values)).inserted_primary_key[0]

        insert("meta", key="schema_version", value="1")
        site_id = insert("sites", name="hospital-a", token_hash=auth.hash_token(auth.new_token()), created_at=1.0)
        researcher_id = insert("researchers", name="alice", token_hash=auth.hash_token(researcher_token), created_at=1.0)
        session_id = insert("sessions", researcher_id=researcher_id, created_at=2.0)
        task_id = insert("tasks", session_id=session_id, researcher_id=researcher_id, image="127.0.0.1:5050/pht/x:1",
                         input=b"{}", recipients="", created_at=2.0)
        insert("runs", task_id=task_id, site_id=site_id, status="completed", attempts=1, lease_id="old-lease",
               updated_at=3.0, exit_code=0, image_digest="sha256:" + "d" * 64)
    engine.dispose()
    yield database_url, {"Authorization": f"Bearer {researcher_token}"}, task_id


def state_of(database_url):
    """(schema version, the runs table's columns) as the database has them now."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT value FROM meta WHERE key = 'schema_version'")).scalar_one()
            columns = {column["name"] for column in sa.inspect(conn).get_columns("runs")}
        return int(version), columns
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
        site_token = auth.new_token()
        store.create_principal(app.extensions["pht"].engine, store.sites, "hospital-b", auth.hash_token(site_token))
        site = {"Authorization": f"Bearer {site_token}"}
        new_task = client.post("/api/tasks", json={"image": "127.0.0.1:5050/pht/x:1", "input": "{}",
                                                   "sites": ["hospital-b"]}, headers=alice).json
        claimed = client.post("/api/site/claim", json={}, headers=site).json
        summary = {"queries": 3, "bytes": 2 ** 40, "refused": 1}
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


def test_two_registries_starting_at_once_upgrade_the_database_once(version_1_database):
    database_url, _, _ = version_1_database
    both_ready = threading.Barrier(2)
    outcomes = []

    def start():
        both_ready.wait(timeout=30)
        try:
            store.open_database(database_url).dispose()
            outcomes.append("started")
        except Exception as error:  # the outcome is asserted below, with the error in the message
            outcomes.append(repr(error))

    starters = [threading.Thread(target=start) for _ in range(2)]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join(timeout=60)
    assert outcomes == ["started", "started"]
    assert state_of(database_url)[0] == store.SCHEMA_VERSION


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
