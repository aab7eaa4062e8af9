"""All of the registry's database access: the schema and every query, in SQLAlchemy Core.

The same code runs on SQLite (the embedded default) and PostgreSQL (give a URL).
Every function that writes does so in one transaction, so no request leaves a
half-written record. Times are stored as UNIX seconds (floats) so both databases
compare them the same way. A database made by an older release is upgraded in
place when the registry opens it (UPGRADES), in one transaction.
"""

import hashlib
import os
import secrets
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from common import names
from master import lifecycle

metadata = sa.MetaData()

STATUS_LENGTH = 32  # of a run's state's name (lifecycle.RunStatus)

meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

sites = sa.Table(
    "sites", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
    sa.Column("last_seen_at", sa.Float),
    sa.Column("runner_version", sa.String(64)),
    sa.Column("sparql_ok", sa.Boolean),
)

researchers = sa.Table(
    "researchers", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

# The registry's operators, for the dashboard and the read-only /api/operator endpoints; the CLI on the
# registry's machine needs no token.
operators = sa.Table(
    "operators", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("researcher_id", sa.Integer, sa.ForeignKey("researchers.id"), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Set when the researcher closes the session: it takes no more tasks, and sites remove its /temp.
    sa.Column("closed_at", sa.Float),
)

researcher_keys = sa.Table(
    "researcher_keys", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("researcher_id", sa.Integer, sa.ForeignKey("researchers.id"), nullable=False, index=True),
    sa.Column("public_key", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("researcher_id", "public_key"),
)

tasks = sa.Table(
    "tasks", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    # Indexed for a session's task count and for the check before it is closed.
    sa.Column("session_id", sa.Integer, sa.ForeignKey("sessions.id"), nullable=False, index=True),
    sa.Column("researcher_id", sa.Integer, sa.ForeignKey("researchers.id"), nullable=False),
    sa.Column("image", sa.String(512), nullable=False),
    # The configuration file exactly as posted: algorithms may depend on every byte.
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("name", sa.String(256)),
    sa.Column("description", sa.Text),
    sa.Column("timeout_seconds", sa.Integer),
    # The age public keys the results are encrypted to, one per line; empty when not encrypted.
    # Copied from the researcher's keys when the task is posted, so later changes cannot redirect it.
    sa.Column("recipients", sa.Text, nullable=False, default=""),
    sa.Column("created_at", sa.Float, nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("site_id", sa.Integer, sa.ForeignKey("sites.id"), nullable=False),
    sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    # A claim is a lease: only the holder of lease_id may report on the run, and
    # only until lease_expires_at, which heartbeats push forward.
    sa.Column("lease_id", sa.String(64)),
    sa.Column("lease_expires_at", sa.Float),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("exit_code", sa.Integer),
    sa.Column("image_digest", sa.String(256)),
    sa.Column("output_sha256", sa.String(64)),
    sa.Column("output_size", sa.BigInteger),
    sa.Column("log_sha256", sa.String(64)),
    sa.Column("log_size", sa.BigInteger),
    # What the algorithm read through the site's SPARQL gateway; all null when the site did not say.
    sa.Column("sparql_queries", sa.BigInteger),
    sa.Column("sparql_bytes", sa.BigInteger),
    sa.Column("sparql_refused", sa.BigInteger),
    # Running because its claim started it (start_pinned), and not moved since (every move clears it): only such a
    # run, with no result or delivery yet, may still be refused from running.
    sa.Column("started_by_claim", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.UniqueConstraint("task_id", "site_id"),
    sa.Index("ix_runs_site_status", "site_id", "status"),
    sa.Index("ix_runs_status_lease", "status", "lease_expires_at"),
)

deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, index=True),
    sa.Column("recipient", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.UniqueConstraint("run_id", "recipient", "name"),
)

run_events = sa.Table(
    "run_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False, index=True),
    sa.Column("status", sa.String(STATUS_LENGTH), nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("reason", sa.Text),
)

# Outputs and logs of at most names.MAX_INLINE_BYTES that came within a finish report (API 1.4), by their sha256:
# kept here, committed with the report, instead of a file each in the result store (master/blobs.py), which
# holds the ones uploaded by requests of their own. The same bytes from many runs are one row.
small_results = sa.Table(
    "small_results", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


class Invalid(ValueError):
    """A value the registry does not store; the message says which rule it breaks."""


class NotFound(Exception):
    """The record does not exist, or is not visible to the caller."""


class Conflict(Exception):
    """The request contradicts what is already stored."""


class LeaseLost(Exception):
    """The caller no longer holds the lease on the run (it expired, was cancelled or is another's)."""


# --- the schema's versions -------------------------------------------------

def _add_columns(conn, table, names):
    """ALTER TABLE ... ADD COLUMN for columns as the table above declares them, in this database's dialect."""
    table_name = conn.dialect.identifier_preparer.format_table(table)
    for name in names:
        column = sa.schema.CreateColumn(table.c[name]).compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE {table_name} ADD COLUMN {column}")


def _add_index(conn, table, column_name):
    """CREATE INDEX for the index the table above declares on that column."""
    [index] = [index for index in table.indexes if [column.name for column in index.columns] == [column_name]]
    index.create(conn)


def _let_sessions_be_closed(conn):
    _add_columns(conn, sessions, ("closed_at",))
    _add_index(conn, tasks, "session_id")


def _widen_status_columns(conn):
    """Room for the longer names of the states a run waits in at its site (awaiting_approval). SQLite does not
    hold a VARCHAR to its length; PostgreSQL does."""
    if conn.dialect.name == "postgresql":
        for table in (runs, run_events):
            conn.exec_driver_sql(f"ALTER TABLE {table.name} ALTER COLUMN status TYPE VARCHAR({STATUS_LENGTH})")


# The step that takes a database from each version (the key) to the next. The tables above are
# always the newest version's; a change to them is one more step here, and create_all makes new
# tables by itself.
UPGRADES = {
    1: lambda conn: _add_columns(conn, runs, ("sparql_queries", "sparql_bytes", "sparql_refused")),
    2: _let_sessions_be_closed,
    3: _widen_status_columns,
    # small_results, which create_all makes: a registry before it would not find the results kept there.
    4: lambda conn: None,
    5: lambda conn: _add_columns(conn, runs, ("started_by_claim",)),
}
SCHEMA_VERSION = 1 + len(UPGRADES)


def open_database(url, pool_size=20, pool_wait_seconds=30):
    """An engine on the registry's database: created when empty, upgraded in place when older.

    Its pool holds pool_size connections, opened as needed and kept: under gevent, thousands of requests share
    them, each for the moment of its queries (a parked long-poll holds none). A request that finds none free
    waits up to pool_wait_seconds, then raises sqlalchemy.exc.TimeoutError, which the app answers with 503.
    """
    engine = sa.create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=pool_wait_seconds)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _tune_sqlite)
    metadata.create_all(engine)
    with engine.begin() as conn:
        # A registry starting at the same time waits here until this one has committed its upgrade,
        # then finds nothing to do: FOR UPDATE on PostgreSQL, the write lock on SQLite.
        if engine.dialect.name == "sqlite":
            # Explicitly, too, because pysqlite starts a transaction only before INSERT, UPDATE or
            # DELETE: ALTER TABLE would otherwise commit on its own.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        found = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")
                             .with_for_update()).scalar()
        if found is None:
            conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        else:
            _upgrade(conn, int(found))
    return engine


def _upgrade(conn, version):
    """Bring a database of this version up to SCHEMA_VERSION, inside the caller's transaction."""
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version is {version}, this registry expects {SCHEMA_VERSION}: "
            "use a registry release that matches the database")
    for step_from in range(version, SCHEMA_VERSION):
        try:
            UPGRADES[step_from](conn)
        except sa.exc.DBAPIError as error:
            raise RuntimeError(
                f"upgrading the database from schema version {step_from} to {step_from + 1} failed, so it "
                f"stays at version {version}, unchanged: {error.orig}. Fix that, then start the registry again"
            ) from error
    if version != SCHEMA_VERSION:
        conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION)))


def _tune_sqlite(dbapi_connection, _record):
    # WAL lets readers proceed while a writer commits; the busy timeout makes
    # concurrent writers wait for each other instead of failing at once.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# --- principals -------------------------------------------------------------

SITE, RESEARCHER, OPERATOR = "site", "researcher", "operator"
PRINCIPALS = {SITE: sites, RESEARCHER: researchers, OPERATOR: operators}
SITE_REVOKED = "revoked: the registry's operator revoked this site"
RESEARCHER_REVOKED = "revoked: the registry's operator revoked the researcher who posted it"


def create_principal(engine, role, name, token_hash):
    problem = names.principal_name_problem(name, role)
    if problem:
        raise Invalid(problem)
    table = PRINCIPALS[role]
    with engine.begin() as conn:
        exists = conn.execute(sa.select(table.c.id).where(table.c.name == name)).first()
        if exists:
            raise Conflict(f"{role} {name!r} already exists")
        conn.execute(table.insert().values(name=name, token_hash=token_hash, created_at=time.time()))


# Built once: every request looks its token up (sites first: they make nearly all requests).
_HOLDERS_OF_TOKEN = [
    (role, sa.select(table.c.id, table.c.name).where(
        table.c.token_hash == sa.bindparam("token_hash"), table.c.revoked_at.is_(None)))
    for role, table in PRINCIPALS.items()]


def find_principal(engine, token_hash):
    """(role, id, name) of the holder of a token that is not revoked, else None."""
    with engine.connect() as conn:
        for role, holders in _HOLDERS_OF_TOKEN:
            row = conn.execute(holders, {"token_hash": token_hash}).first()
            if row:
                return role, row.id, row.name
    return None


def roles_named(engine, name):
    """The roles (site, researcher) that have someone called name, revoked or not."""
    with engine.connect() as conn:
        return [role for role, table in PRINCIPALS.items()
                if conn.execute(sa.select(table.c.id).where(table.c.name == name)).first()]


# Revoking or replacing a token tells every registry process that caches token holders (master/token_cache.py):
# on PostgreSQL by a NOTIFY on this channel, in the change's transaction; on SQLite by a stamp file beside the
# database, rewritten once the change is committed.
TOKENS_CHANGED_CHANNEL = "pht_tokens_changed"
# The payload a replica's relay reads: a replica id that is none of theirs, then a key.
_TOKENS_CHANGED_PAYLOAD = "000000000000 1"


def tokens_stamp_path(engine):
    """The stamp file of an SQLite database file's token changes; None on PostgreSQL (or SQLite in memory)."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database + "-tokens-changed")


def _tell_of_token_change(conn):
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"),
                     {"channel": TOKENS_CHANGED_CHANNEL, "payload": _TOKENS_CHANGED_PAYLOAD})


def _stamp_token_change(engine):
    """After the commit: a process that reads the stamp before it finds the change in the database would keep
    the old holder under the new stamp."""
    stamp = tokens_stamp_path(engine)
    if stamp is not None:
        written = stamp.with_name(stamp.name + ".new")
        written.write_bytes(secrets.token_bytes(16))
        os.replace(written, stamp)


def revoke_principal(engine, role, name, now=None):
    """Revoke the site, researcher or operator called name, and end what it leaves unfinished, in one transaction:
    a site's runs that have not ended fail, a researcher's are cancelled (no site can claim them after); an
    operator only reads, and leaves nothing. Returns the ids of the runs ended; NotFound if there is no such
    active one. Every registry process stops taking the token at once (master/token_cache.py)."""
    ended = _revoke(engine, role, name, now if now is not None else time.time())
    _stamp_token_change(engine)
    return ended


def _revoke(engine, role, name, now):
    table = PRINCIPALS[role]
    with engine.begin() as conn:
        _tell_of_token_change(conn)
        principal_id = conn.execute(
            table.update().where(table.c.name == name, table.c.revoked_at.is_(None))
            .values(revoked_at=now).returning(table.c.id)).scalar()
        if principal_id is None:
            raise NotFound(f"no active {role} is called {name!r}")
        if role == SITE:
            ended = _end_runs(conn, runs.c.site_id == principal_id, lifecycle.FAILABLE_STATES,
                              lifecycle.FAILED, SITE_REVOKED, now)
        elif role == OPERATOR:
            ended = []
        else:
            ended = _end_runs(conn, runs.c.task_id.in_(sa.select(tasks.c.id).where(tasks.c.researcher_id == principal_id)),
                              lifecycle.CANCELLABLE_STATES, lifecycle.CANCELLED, RESEARCHER_REVOKED, now)
    return ended


def _end_runs(conn, which, from_states, status, reason, now):
    """End the runs which selects that are in from_states; returns their ids. One statement for all of them:
    a run claimed at the same moment is either ended here or not claimed. A site that holds one learns
    its end at its next heartbeat, with its lease."""
    ended = conn.execute(
        runs.update().where(which, runs.c.status.in_(from_states))
        .values(status=status, reason=reason, updated_at=now)
        .returning(runs.c.id)).scalars().all()
    for run_id in ended:
        _record_event(conn, run_id, status, now, reason)
    return ended


def replace_token(engine, role, name, token_hash):
    """Give the site or researcher called name a new token; the old one stops working at once. A revoked
    one becomes active again (its ended runs stay ended). NotFound if there is none of that name."""
    table = PRINCIPALS[role]
    with engine.begin() as conn:
        _tell_of_token_change(conn)
        replaced = conn.execute(table.update().where(table.c.name == name)
                                .values(token_hash=token_hash, revoked_at=None)).rowcount
    if not replaced:
        raise NotFound(f"no {role} is called {name!r}")
    _stamp_token_change(engine)


def list_researchers(engine):
    with engine.connect() as conn:
        rows = conn.execute(sa.select(researchers.c.name, researchers.c.created_at, researchers.c.revoked_at)
                            .order_by(researchers.c.name)).mappings().all()
    return [dict(r) for r in rows]


def list_operators(engine):
    with engine.connect() as conn:
        rows = conn.execute(sa.select(operators.c.name, operators.c.created_at, operators.c.revoked_at)
                            .order_by(operators.c.name)).mappings().all()
    return [dict(r) for r in rows]


def active_runs_by_site(engine):
    """For the operator: how many runs each site has that have not ended (site id -> count; none: absent)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(runs.c.site_id, sa.func.count()).where(
            runs.c.status.notin_(lifecycle.TERMINAL_STATES)).group_by(runs.c.site_id)).all()
    return dict(rows)


def list_sites(engine, include_revoked=True, page=1, per_page=None):
    """Sites by name (one page of them when per_page is given), and how many there are in all."""
    where = [] if include_revoked else [sites.c.revoked_at.is_(None)]
    query = sa.select(sites).where(*where).order_by(sites.c.name)
    if per_page is not None:
        query = query.limit(per_page).offset((page - 1) * per_page)
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(sites).where(*where)).scalar_one()
        rows = conn.execute(query).mappings().all()
    return [dict(r) for r in rows], total


_SITES_NAMED = sa.select(sites.c.name, sites.c.id).where(
    sites.c.name.in_(sa.bindparam("names", expanding=True)), sites.c.revoked_at.is_(None))


def site_ids_by_name(conn, names):
    rows = conn.execute(_SITES_NAMED, {"names": list(names)}).all()
    found = {name: site_id for name, site_id in rows}
    unknown = sorted(set(names) - set(found))
    if unknown:
        raise NotFound(f"unknown site(s): {', '.join(unknown)}")
    return [found[n] for n in names]


def record_site_seen(engine, site_id, runner_version, sparql_ok, now=None):
    record_sites_seen(engine, {site_id: ((runner_version, sparql_ok), now if now is not None else time.time())})


_A_SIGHTING = sites.update().where(sites.c.id == sa.bindparam("seen_site")).values(
    last_seen_at=sa.bindparam("seen_at"), runner_version=sa.bindparam("seen_version"),
    sparql_ok=sa.bindparam("seen_sparql_ok"))


def record_sites_seen(engine, sightings):
    """Write {site id: ((runner version, SPARQL answering), when)} in one transaction."""
    with engine.begin() as conn:
        conn.execute(_A_SIGHTING, [{"seen_site": site_id, "seen_at": at, "seen_version": version,
                                    "seen_sparql_ok": sparql_ok}
                                   for site_id, ((version, sparql_ok), at) in sightings.items()])


# --- tasks ------------------------------------------------------------------

def create_task(engine, researcher_id, image, input_bytes, site_names, session_id=None,
                name=None, description=None, timeout_seconds=None, encrypt=False):
    """Store a task and one pending run per target site; returns (task_id, site_ids)."""
    now = time.time()
    with engine.begin() as conn:
        recipients = []
        if encrypt:
            recipients = list(conn.execute(
                sa.select(researcher_keys.c.public_key).where(researcher_keys.c.researcher_id == researcher_id)
                .order_by(researcher_keys.c.id)).scalars())
            if not recipients:
                raise Conflict("an encrypted task needs a public key: register one first "
                               "(python -m researcher keygen)")
        if site_names is None:
            site_ids = list(conn.execute(
                sa.select(sites.c.id).where(sites.c.revoked_at.is_(None)).order_by(sites.c.id)).scalars())
            if not site_ids:
                raise NotFound("no sites are registered yet")
        else:
            site_ids = site_ids_by_name(conn, site_names)
        continued_session = session_id is not None
        if continued_session:
            owner = conn.execute(
                sa.select(sessions.c.researcher_id).where(sessions.c.id == session_id)).scalar()
            if owner != researcher_id:
                raise NotFound(f"session {session_id} does not exist")
        else:
            session_id = conn.execute(sessions.insert(), {"researcher_id": researcher_id, "created_at": now}
                                      ).inserted_primary_key[0]
        task_id = conn.execute(tasks.insert(), {
            "session_id": session_id, "researcher_id": researcher_id, "image": image, "input": input_bytes,
            "name": name, "description": description, "timeout_seconds": timeout_seconds,
            "recipients": "\n".join(recipients), "created_at": now,
        }).inserted_primary_key[0]
        # A statement each for every site's run and for their events, not two per site.
        run_ids = conn.execute(runs.insert().returning(runs.c.id, sort_by_parameter_order=True), [
            {"task_id": task_id, "site_id": site_id, "status": lifecycle.PENDING, "attempts": 0, "updated_at": now}
            for site_id in site_ids]).scalars().all()
        conn.execute(_AN_EVENT, [{"run_id": run_id, "status": lifecycle.PENDING, "at": now, "reason": None}
                                 for run_id in run_ids])
        # Checked last, once the inserts hold SQLite's write lock, and with the session's row locked on
        # PostgreSQL: a close_session at the same moment either finds this task's runs or is found here.
        # FOR NO KEY UPDATE (key_share): FOR UPDATE would wait for the key-share lock that another task's
        # insert into the same session holds, while that one waits for this one's: a deadlock.
        if continued_session and conn.execute(_WHEN_SESSION_CLOSED, {"session": session_id}).scalar() is not None:
            raise Conflict(f"session {session_id} is closed; omit session_id to start a new one")
        # Likewise a revoke at the same moment: it either finds these runs to end, or is found here. FOR SHARE
        # waits for a revoke that has not committed yet, and conflicts with its update of the row.
        if conn.execute(_WHEN_RESEARCHER_REVOKED, {"researcher": researcher_id}).scalar() is not None:
            raise Conflict("this researcher's token was revoked meanwhile")
        if conn.execute(_HOW_MANY_UNREVOKED, {"sites": site_ids}).scalar() != len(site_ids):
            raise Conflict("a site was revoked meanwhile; post the task again")
    return task_id, site_ids


# create_task's checks, locking what they read (why: see there).
_WHEN_SESSION_CLOSED = sa.select(sessions.c.closed_at).where(
    sessions.c.id == sa.bindparam("session")).with_for_update(key_share=True)
_WHEN_RESEARCHER_REVOKED = sa.select(researchers.c.revoked_at).where(
    researchers.c.id == sa.bindparam("researcher")).with_for_update(read=True)
_HOW_MANY_UNREVOKED = sa.select(sa.func.count()).select_from(
    sa.select(sites.c.id).where(sites.c.id.in_(sa.bindparam("sites", expanding=True)), sites.c.revoked_at.is_(None))
    .with_for_update(read=True).subquery())


_TASK_COLUMNS = [c for c in tasks.c if c.name != "input"]


_A_RESEARCHERS_TASK = sa.select(*_TASK_COLUMNS).where(
    tasks.c.id == sa.bindparam("task"), tasks.c.researcher_id == sa.bindparam("researcher"))


def get_task(engine, task_id, researcher_id):
    with engine.connect() as conn:
        task = conn.execute(_A_RESEARCHERS_TASK, {"task": task_id, "researcher": researcher_id}).mappings().first()
        if task is None:
            raise NotFound(f"task {task_id} does not exist")
        return _with_runs(conn, [task])[0]


def list_tasks(engine, researcher_id, session_id=None, status=None, page=1, per_page=50):
    """One page of the researcher's tasks, oldest first, and how many match in all."""
    where = [tasks.c.researcher_id == researcher_id]
    if session_id is not None:
        where.append(tasks.c.session_id == session_id)
    if status is not None:
        where.append(_task_status_condition(status))
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(tasks).where(*where)).scalar_one()
        page_rows = conn.execute(
            sa.select(*_TASK_COLUMNS).where(*where).order_by(tasks.c.id)
            .limit(per_page).offset((page - 1) * per_page)).mappings().all()
        return _with_runs(conn, page_rows), total


def list_all_tasks(engine, researcher=None, site=None, status=None, page=1, per_page=50):
    """For the operator: one page of every researcher's tasks, oldest first, each with its researcher's name, and
    how many match in all. researcher and site are names; site keeps the tasks that have a run at that site."""
    where = []
    if researcher is not None:
        where.append(tasks.c.researcher_id.in_(sa.select(researchers.c.id).where(researchers.c.name == researcher)))
    if site is not None:
        where.append(sa.exists().where(runs.c.task_id == tasks.c.id, runs.c.site_id.in_(
            sa.select(sites.c.id).where(sites.c.name == site))))
    if status is not None:
        where.append(_task_status_condition(status))
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(tasks).where(*where)).scalar_one()
        page_rows = conn.execute(
            sa.select(*_TASK_COLUMNS, researchers.c.name.label("researcher"))
            .join(researchers, researchers.c.id == tasks.c.researcher_id).where(*where).order_by(tasks.c.id)
            .limit(per_page).offset((page - 1) * per_page)).mappings().all()
        return _with_runs(conn, page_rows), total


def _task_status_condition(status):
    """SQL for lifecycle.task_status: a task's status is derived from its runs, never stored."""
    def any_run(condition):
        return sa.exists().where(runs.c.task_id == tasks.c.id, condition)

    active = any_run(runs.c.status.notin_(lifecycle.TERMINAL_STATES))
    all_completed = ~any_run(runs.c.status != lifecycle.COMPLETED)
    all_cancelled = ~any_run(runs.c.status != lifecycle.CANCELLED)
    return {
        lifecycle.TaskStatus.ACTIVE: active,
        lifecycle.TaskStatus.COMPLETED: all_completed,
        lifecycle.TaskStatus.CANCELLED: all_cancelled,
        lifecycle.TaskStatus.FINISHED_WITH_ERRORS: sa.and_(~active, ~all_completed, ~all_cancelled),
    }[status]


_RUNS_OF_TASKS = (sa.select(runs, sites.c.name.label("site")).join(sites, sites.c.id == runs.c.site_id)
                  .where(runs.c.task_id.in_(sa.bindparam("tasks", expanding=True))).order_by(runs.c.id))
_DELIVERIES_OF_TASKS = (sa.select(deliveries).join(runs, runs.c.id == deliveries.c.run_id)
                        .where(runs.c.task_id.in_(sa.bindparam("tasks", expanding=True))).order_by(deliveries.c.id))


def _with_runs(conn, task_rows):
    ids = [t["id"] for t in task_rows]
    runs_by_task = {task_id: [] for task_id in ids}
    for run in conn.execute(_RUNS_OF_TASKS, {"tasks": ids}).mappings():
        runs_by_task[run["task_id"]].append(dict(run))
    result = []
    run_ids = [run["id"] for task_runs in runs_by_task.values() for run in task_runs]
    deliveries_by_run = {run_id: [] for run_id in run_ids}
    for delivery in conn.execute(_DELIVERIES_OF_TASKS, {"tasks": ids}).mappings():
        deliveries_by_run[delivery["run_id"]].append(dict(delivery))
    for task_runs in runs_by_task.values():
        for run in task_runs:
            run["deliveries"] = deliveries_by_run[run["id"]]
            run["sparql"] = _sparql_summary(run)
    for row in task_rows:
        task = dict(row)
        task["encrypted_to"] = task.pop("recipients").split()
        task["runs"] = runs_by_task[task["id"]]
        task["status"] = lifecycle.task_status([r["status"] for r in task["runs"]])
        result.append(task)
    return result


# A run's SPARQL summary as the API shows it: its key -> the runs column that stores it.
_SPARQL_SUMMARY_COLUMNS = {"queries": "sparql_queries", "bytes": "sparql_bytes", "refused": "sparql_refused"}


def _sparql_columns(summary):
    return {column: None if summary is None else summary[key] for key, column in _SPARQL_SUMMARY_COLUMNS.items()}


def _sparql_summary(run):
    """The run's summary, or None when its site reported none (its columns are written all at once)."""
    if run["sparql_queries"] is None:
        return None
    return {key: run[column] for key, column in _SPARQL_SUMMARY_COLUMNS.items()}


def get_task_input(engine, task_id):
    with engine.connect() as conn:
        return conn.execute(sa.select(tasks.c.input).where(tasks.c.id == task_id)).scalar_one()


def cancel_task(engine, task_id, researcher_id):
    now = time.time()
    with engine.begin() as conn:
        owner = conn.execute(sa.select(tasks.c.researcher_id).where(tasks.c.id == task_id)).scalar()
        if owner != researcher_id:
            raise NotFound(f"task {task_id} does not exist")
        return _end_runs(conn, runs.c.task_id == task_id, lifecycle.CANCELLABLE_STATES, lifecycle.CANCELLED,
                         "cancelled by the researcher", now)


# --- sessions ---------------------------------------------------------------

_SESSION_COLUMNS = (
    sessions.c.id, sessions.c.created_at, sessions.c.closed_at,
    sa.select(sa.func.count()).select_from(tasks).where(tasks.c.session_id == sessions.c.id)
    .scalar_subquery().label("task_count"),
)


def list_sessions(engine, researcher_id, page=1, per_page=50):
    """One page of the researcher's sessions, oldest first, with how many tasks each has; and how many in all."""
    where = sessions.c.researcher_id == researcher_id
    with engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(sessions).where(where)).scalar_one()
        rows = conn.execute(sa.select(*_SESSION_COLUMNS).where(where).order_by(sessions.c.id)
                            .limit(per_page).offset((page - 1) * per_page)).mappings().all()
    return [dict(row) for row in rows], total


def close_session(engine, session_id, researcher_id, now=None):
    """Close one of the researcher's sessions once all its runs have ended; returns the session.

    Closing a closed session again changes nothing. A session with a run still under way is a
    conflict: closing it would remove the sites' /temp under a running algorithm.
    """
    now = time.time() if now is None else now
    with engine.begin() as conn:
        # The write comes first: it takes SQLite's write lock and locks the row on PostgreSQL, so a task
        # being added at the same moment is either among the runs checked below or finds the session
        # closed (create_task).
        closed = conn.execute(
            sessions.update()
            .where(sessions.c.id == session_id, sessions.c.researcher_id == researcher_id)
            .values(closed_at=sa.func.coalesce(sessions.c.closed_at, now))
            .returning(sessions.c.id)).scalar()
        if closed is None:
            raise NotFound(f"session {session_id} does not exist")
        unfinished = list(conn.execute(
            sa.select(tasks.c.id).distinct().join(runs, runs.c.task_id == tasks.c.id)
            .where(tasks.c.session_id == session_id, runs.c.status.notin_(lifecycle.TERMINAL_STATES))
            .order_by(tasks.c.id)).scalars())
        if unfinished:
            raise Conflict(_unfinished_session_message(session_id, unfinished))
        return dict(conn.execute(sa.select(*_SESSION_COLUMNS).where(sessions.c.id == session_id)).mappings().one())


# How many of a session's unfinished tasks a refusal to close it names; it counts the others.
_TASKS_NAMED = 10


def _unfinished_session_message(session_id, task_ids):
    if len(task_ids) == 1:
        return f"session {session_id} has a task under way: cancel task {task_ids[0]} or wait for it, then close it"
    named = ", ".join(str(task_id) for task_id in task_ids[:_TASKS_NAMED])
    if len(task_ids) > _TASKS_NAMED:
        named += f" and {len(task_ids) - _TASKS_NAMED} more"
    return f"session {session_id} has tasks under way: cancel tasks {named} or wait for them, then close it"


def closed_sessions(engine, session_ids):
    """Those of session_ids whose session is closed or does not exist, in order: what a site may forget."""
    with engine.connect() as conn:
        still_open = set(conn.execute(sa.select(sessions.c.id).where(
            sessions.c.id.in_(session_ids), sessions.c.closed_at.is_(None))).scalars())
    return sorted(set(session_ids) - still_open)


# --- runs, as seen by sites -------------------------------------------------
# The statements that every claim and report runs are built once, here: building one (and its cache key) costs
# more CPU than SQLite takes to run it (docs/performance.md, section 11).

_A_PENDING_RUN = sa.select(runs.c.id).where(
    runs.c.site_id == sa.bindparam("site_id"), runs.c.status == lifecycle.PENDING).limit(1)

# What the site is told of the run it claimed; the task's input with it when it is small (None otherwise).
_A_CLAIMED_RUN = (
    sa.select(runs.c.id, runs.c.task_id, runs.c.lease_id, runs.c.lease_expires_at,
              tasks.c.image, tasks.c.session_id, tasks.c.timeout_seconds, tasks.c.name,
              tasks.c.recipients, researchers.c.name.label("researcher"),
              sa.case((sa.func.length(tasks.c.input) <= names.MAX_INLINE_BYTES, tasks.c.input)).label("input"))
    .join(tasks, tasks.c.id == runs.c.task_id)
    .join(researchers, researchers.c.id == tasks.c.researcher_id)
    .where(runs.c.id == sa.bindparam("run_id")))


# The site's oldest pending run, leased: one atomic statement.
_A_LEASE = (
    runs.update()
    .where(runs.c.id == (
        sa.select(runs.c.id)
        .where(runs.c.site_id == sa.bindparam("site"), runs.c.status == lifecycle.PENDING)
        .order_by(runs.c.id).limit(1)
        # On PostgreSQL two registries claiming at once skip each other's row
        # instead of both taking it; SQLite serialises writers anyway.
        .with_for_update(skip_locked=True)
        .scalar_subquery()), runs.c.status == lifecycle.PENDING)
    .values(status=lifecycle.CLAIMED, lease_id=sa.bindparam("new_lease_id"),
            lease_expires_at=sa.bindparam("new_expiry"), attempts=runs.c.attempts + 1,
            updated_at=sa.bindparam("now"))
    .returning(runs.c.id))


def claim_next_run(engine, site_id, lease_seconds, look_first=True, start_pinned=False):
    """Lease the site's oldest pending run to the caller; None if none. Most claims find nothing: with look_first a
    read says so without taking the database's write lock (a claim woken by news for its site need not ask). With
    start_pinned, a run whose image is pinned by digest is also started, with that digest ("started" says so)."""
    now = time.time()
    if look_first:
        with engine.connect() as conn:
            if conn.execute(_A_PENDING_RUN, {"site_id": site_id}).first() is None:
                return None
    with engine.begin() as conn:
        run_id = conn.execute(_A_LEASE, {"site": site_id, "new_lease_id": secrets.token_hex(16),
                                         "new_expiry": now + lease_seconds, "now": now}).scalar()
        if run_id is None:
            return None
        _record_event(conn, run_id, lifecycle.CLAIMED, now)
        claimed = dict(conn.execute(_A_CLAIMED_RUN, {"run_id": run_id}).mappings().one())
        digest = names.pinned_digest(claimed["image"]) if start_pinned else None
        if digest:
            _move(conn, {"id": run_id, "status": lifecycle.CLAIMED}, lifecycle.RUNNING, now, image_digest=digest,
                  started_by_claim=True)
    claimed["recipients"] = claimed["recipients"].split()
    claimed["started"] = digest is not None
    return claimed


def get_site_run(engine, run_id, site_id):
    with engine.connect() as conn:
        return dict(_site_run(conn, run_id, site_id))


_A_SITES_RUN = sa.select(runs).where(runs.c.id == sa.bindparam("run"), runs.c.site_id == sa.bindparam("site"))


def _site_run(conn, run_id, site_id):
    """The run, if it is this site's; NotFound otherwise, whether it exists or not."""
    row = conn.execute(_A_SITES_RUN, {"run": run_id, "site": site_id}).mappings().first()
    if row is None:
        raise NotFound(f"run {run_id} does not exist")
    return row


def _leased_run(conn, run_id, site_id, lease_id, allowed_states):
    return _leased(_site_run(conn, run_id, site_id), lease_id, allowed_states)


def _leased(row, lease_id, allowed_states):
    """The run's row, if it is leased to the holder of lease_id in one of allowed_states; LeaseLost otherwise."""
    if row["lease_id"] != lease_id or row["status"] not in allowed_states:
        raise LeaseLost(f"run {row['id']} is {row['status']} and no longer leased to this runner")
    return row


# A run's move from one status: what it sets are the columns given with "run" and "from_status".
_A_MOVE = runs.update().where(runs.c.id == sa.bindparam("run"), runs.c.status == sa.bindparam("from_status"))


def _move(conn, row, status, now, reason=None, **values):
    """Move the run (row: as read in this transaction) to status for reason (None: none, any reason before is
    cleared), with an event in its history. Only a move
    lifecycle.TRANSITIONS lists is made; a run that changed meanwhile (a cancel) is not overwritten."""
    try:
        lifecycle.check_move(row["status"], status)
    except lifecycle.NotAllowed as error:
        raise Conflict(f"run {row['id']}: {error}") from None
    moved = conn.execute(_A_MOVE, {"run": row["id"], "from_status": row["status"], "status": status,
                                   "reason": reason, "updated_at": now, "started_by_claim": False, **values}).rowcount
    if not moved:
        raise LeaseLost(f"run {row['id']} changed meanwhile; it is no longer {row['status']}")
    _record_event(conn, row["id"], status, now, reason)


def mark_run_started(engine, run_id, site_id, lease_id, image_digest):
    now = time.time()
    with engine.begin() as conn:
        row = _leased_run(conn, run_id, site_id, lease_id, (lifecycle.CLAIMED,))
        _move(conn, row, lifecycle.RUNNING, now, image_digest=image_digest)


def park_run(engine, run_id, site_id, lease_id, status, reason, image_digest=None):
    """The site parks its run while a person there decides (lifecycle.PARKED_STATES): awaiting approval before it
    runs, or held for review before its output leaves. The site keeps the lease, which no longer runs out.
    Parking it again in the same state changes nothing (a runner restarted after it asked). Returns the task id."""
    now = time.time()
    with engine.begin() as conn:
        row = _site_run(conn, run_id, site_id)
        if row["status"] == status and row["lease_id"] == lease_id:
            return row["task_id"]
        row = _leased(row, lease_id, (lifecycle.PARKED_FROM[status],))
        digest = {} if image_digest is None else {"image_digest": image_digest}
        _move(conn, row, status, now, reason, lease_expires_at=None, **digest)
    return row["task_id"]


_A_LEASE_RENEWAL = runs.update().where(runs.c.id == sa.bindparam("run"))  # sets lease_expires_at


def resume_run(engine, run_id, site_id, lease_id, lease_seconds):
    """The site goes on with a parked run (approved, or its output released): it is leased again as before it
    was parked; returns that status. Resuming it again only renews the lease."""
    now = time.time()
    with engine.begin() as conn:
        row = _leased_run(conn, run_id, site_id, lease_id,
                          lifecycle.PARKED_STATES + tuple(lifecycle.PARKED_FROM.values()))
        if row["status"] in lifecycle.PARKED_STATES:
            status = lifecycle.PARKED_FROM[row["status"]]
            _move(conn, row, status, now, lease_expires_at=now + lease_seconds)
            return status
        conn.execute(_A_LEASE_RENEWAL, {"run": run_id, "lease_expires_at": now + lease_seconds})
        return row["status"]


def extend_lease(engine, run_id, site_id, lease_id, lease_seconds):
    """Push the lease forward; returns the run's status (the runner stops work on 'cancelled').
    A parked run's lease does not run out: its status is only read."""
    now = time.time()
    with engine.begin() as conn:
        row = _site_run(conn, run_id, site_id)
        if row["status"] == lifecycle.CANCELLED:
            return lifecycle.CANCELLED
        row = _leased(row, lease_id, lifecycle.LEASED_STATES + lifecycle.PARKED_STATES)
        if row["status"] in lifecycle.LEASED_STATES:
            conn.execute(_A_LEASE_RENEWAL, {"run": run_id, "lease_expires_at": now + lease_seconds})
        return row["status"]


def attach_blob(engine, run_id, site_id, lease_id, kind, sha256, size):
    """Record a stored output or log for a run. The same blob twice is fine; another is a conflict."""
    with engine.begin() as conn:
        row = _site_run(conn, run_id, site_id)
        existing = row[f"{kind}_sha256"]
        if existing == sha256:
            return
        if existing is not None or row["status"] in lifecycle.TERMINAL_STATES:
            raise Conflict(f"run {run_id} already has a different {kind}")
        _leased(row, lease_id, lifecycle.LEASED_STATES)
        conn.execute(runs.update().where(runs.c.id == run_id).values(
            {f"{kind}_sha256": sha256, f"{kind}_size": size}))


def finish_run(engine, run_id, site_id, lease_id, exit_code, failure_reason, sparql=None, carried=None):
    """Record how a run ended; returns (status, task id).

    sparql is the site's SPARQL summary ({"queries", "bytes", "refused"}), or None when it has none. carried are
    the output and log the report carried ({"output" or "log": bytes}), kept in small_results in the same
    transaction. The same report again is fine, another a conflict; the summary and the results are part of the
    report, so a repeat with other counts (or with none after some), or another result, is a conflict too.
    """
    now = time.time()
    status = lifecycle.status_after_finish(exit_code, failure_reason)
    reason = lifecycle.failure_reason_for(exit_code, failure_reason)
    results = {kind: (hashlib.sha256(data).hexdigest(), len(data)) for kind, data in (carried or {}).items()}
    attached = {f"{kind}_{column}": value for kind, (sha256, size) in results.items()
                for column, value in (("sha256", sha256), ("size", size))}
    # Written with the move to status, for reason.
    values = {"exit_code": exit_code, **_sparql_columns(sparql), **attached}
    report = {"status": status, "reason": reason, **values}
    with engine.begin() as conn:
        row = _site_run(conn, run_id, site_id)
        if row["status"] in (lifecycle.COMPLETED, lifecycle.FAILED) and row["lease_id"] == lease_id:
            if all(row[column] == value for column, value in report.items()):
                return status, row["task_id"]
            raise Conflict(f"run {run_id} was already reported as {row['status']}, with another exit code, "
                           "reason, SPARQL summary or result")
        row = _leased(row, lease_id, lifecycle.LEASED_STATES)
        for kind in results:
            if row[f"{kind}_sha256"] not in (None, attached[f"{kind}_sha256"]):
                raise Conflict(f"run {run_id} already has a different {kind}")
        if carried:
            # In sha256 order: on PostgreSQL an insert waits for another transaction's of the same key, and two
            # reports of crossed results (output of one the log of the other) taken in their own orders deadlock.
            kept = sorted({results[kind][0]: data for kind, data in carried.items()}.items())
            conn.execute(_KEEP_SMALL_RESULT[conn.dialect.name], [{"sha256": sha256, "data": data}
                                                                 for sha256, data in kept])
        _move(conn, row, status, now, reason, lease_expires_at=None, **values)
    return status, row["task_id"]


# A small result, unless the same bytes are kept already (by another run, or by another transaction just now).
_KEEP_SMALL_RESULT = {
    "sqlite": sqlite.insert(small_results).on_conflict_do_nothing(index_elements=["sha256"]),
    "postgresql": postgresql.insert(small_results).on_conflict_do_nothing(index_elements=["sha256"]),
}
_SMALL_RESULTS = sa.select(small_results.c.sha256, small_results.c.data).where(
    small_results.c.sha256.in_(sa.bindparam("wanted", expanding=True)))


def small_results_of(engine, sha256s):
    """{sha256: bytes} of those given that small_results keeps."""
    with engine.connect() as conn:
        return dict(conn.execute(_SMALL_RESULTS, {"wanted": list(sha256s)}).all())


_A_DELIVERY_OF_RUN = sa.select(deliveries.c.id).where(deliveries.c.run_id == sa.bindparam("run")).limit(1)


def refuse_run(engine, run_id, site_id, lease_id, reason):
    """Record that the site will not run it; returns the task id."""
    now = time.time()
    with engine.begin() as conn:
        row = _site_run(conn, run_id, site_id)
        # From running only if its claim started it and nothing came of it since (no result, no delivery): a run
        # that ran cannot be hidden as refused. It ran nothing, so it keeps no digest of an image that ran.
        refusable_running = row["started_by_claim"] and row["output_sha256"] is None and row["log_sha256"] is None \
            and conn.execute(_A_DELIVERY_OF_RUN, {"run": run_id}).first() is None
        row = _leased(row, lease_id, (lifecycle.CLAIMED, lifecycle.AWAITING_APPROVAL)
                      + ((lifecycle.RUNNING,) if refusable_running else ()))
        ran_nothing = {"image_digest": None} if row["status"] == lifecycle.RUNNING else {}
        _move(conn, row, lifecycle.REFUSED, now, reason, lease_expires_at=None, **ran_nothing)
    return row["task_id"]


def expire_overdue_leases(engine):
    """Return runs whose lease ran out to the queue (or fail them); returns (run, site, new status, task)s."""
    now = time.time()
    expired = []
    overdue_condition = sa.and_(runs.c.status.in_(lifecycle.LEASED_STATES), runs.c.lease_expires_at < now)
    # Nearly always nothing is overdue: find that out with a read, not a write transaction.
    with engine.connect() as conn:
        if conn.execute(sa.select(runs.c.id).where(overdue_condition).limit(1)).first() is None:
            return expired
    with engine.begin() as conn:
        overdue = conn.execute(
            sa.select(runs.c.id, runs.c.site_id, runs.c.attempts, runs.c.task_id)
            .where(overdue_condition)
            .with_for_update(skip_locked=True)).all()
        for run_id, site_id, attempts, task_id in overdue:
            status = lifecycle.status_after_expiry(attempts)
            reason = None if status == lifecycle.PENDING else f"lease ran out {attempts} times"
            # Checked again as it is written: SQLite locks no rows, so a revocation or cancellation may
            # have ended the run since it was read, and must not be undone.
            # A digest its claim recorded (start_pinned) is none of an image that ran: the next claim starts afresh.
            if not conn.execute(runs.update().where(runs.c.id == run_id, overdue_condition).values(
                    status=status, reason=reason, lease_id=None, lease_expires_at=None, updated_at=now,
                    image_digest=sa.case((runs.c.started_by_claim == sa.true(), sa.null()), else_=runs.c.image_digest),
                    started_by_claim=False)).rowcount:
                continue
            _record_event(conn, run_id, lifecycle.EXPIRED, now, "lease ran out")
            _record_event(conn, run_id, status, now, reason)
            expired.append((run_id, site_id, status, task_id))
    return expired


def add_researcher_key(engine, researcher_id, public_key):
    with engine.begin() as conn:
        exists = conn.execute(sa.select(researcher_keys.c.id).where(
            researcher_keys.c.researcher_id == researcher_id, researcher_keys.c.public_key == public_key)).scalar()
        if exists:
            return exists
        return conn.execute(researcher_keys.insert().values(
            researcher_id=researcher_id, public_key=public_key, created_at=time.time())).inserted_primary_key[0]


def list_researcher_keys(engine, researcher_id):
    with engine.connect() as conn:
        rows = conn.execute(sa.select(researcher_keys.c.id, researcher_keys.c.public_key, researcher_keys.c.created_at)
                            .where(researcher_keys.c.researcher_id == researcher_id)
                            .order_by(researcher_keys.c.id)).mappings().all()
    return [dict(r) for r in rows]


def remove_researcher_key(engine, researcher_id, key_id):
    with engine.begin() as conn:
        removed = conn.execute(researcher_keys.delete().where(
            researcher_keys.c.id == key_id, researcher_keys.c.researcher_id == researcher_id)).rowcount
    if not removed:
        raise NotFound(f"key {key_id} does not exist")


def record_delivery(engine, run_id, site_id, lease_id, recipient, name, size, sha256):
    """A receipt for a file the site sent straight to a recipient; the same receipt twice is fine."""
    with engine.begin() as conn:
        existing = conn.execute(sa.select(deliveries).where(
            deliveries.c.run_id == run_id, deliveries.c.recipient == recipient,
            deliveries.c.name == name)).mappings().first()
        if existing:
            if (existing["size"], existing["sha256"]) != (size, sha256):
                raise Conflict(f"run {run_id} already delivered another {name} to {recipient}")
            return
        _leased_run(conn, run_id, site_id, lease_id, lifecycle.LEASED_STATES)
        conn.execute(deliveries.insert().values(run_id=run_id, recipient=recipient, name=name, size=size,
                                                sha256=sha256, at=time.time()))


def get_researcher_run(engine, run_id, researcher_id):
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(runs).join(tasks, tasks.c.id == runs.c.task_id)
            .where(runs.c.id == run_id, tasks.c.researcher_id == researcher_id)).mappings().first()
    if row is None:
        raise NotFound(f"run {run_id} does not exist")
    return dict(row)


def run_history(engine, run_id):
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(run_events.c.status, run_events.c.at, run_events.c.reason)
            .where(run_events.c.run_id == run_id).order_by(run_events.c.id)).mappings().all()
    return [dict(r) for r in rows]


_AN_EVENT = run_events.insert()


def _record_event(conn, run_id, status, at, reason=None):
    conn.execute(_AN_EVENT, {"run_id": run_id, "status": status, "at": at, "reason": reason})
