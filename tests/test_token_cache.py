"""The registry remembers who holds a token (master/token_cache.py), and forgets at once when a token is revoked
or replaced: in this process, by the operator's command in another, and on PostgreSQL by another replica's."""

import subprocess
import sys

import pytest

from master import auth, store
from scripts.federation import ROOT
from tests.images import wait_until
from tests.test_parked_claims import every_announcement_heard, queries  # noqa: F401 (fixtures)


@pytest.fixture
def token(app):
    value = auth.new_token()
    store.create_principal(app.extensions["pht"].engine, store.RESEARCHER, "alice", auth.hash_token(value))
    return value


def token_lookups(statements):
    """Of the statements sent to the database, those that asked who holds a token."""
    return [statement for statement in statements
            if "token_hash" in statement and statement.lstrip().upper().startswith("SELECT")]


def tasks_status(client, token):
    return client.get("/api/tasks", headers={"Authorization": f"Bearer {token}"}).status_code


def operator_command(app, *command):
    """TaskMaster's command on this registry's database, in a process of its own, as the operator runs it."""
    settings = app.extensions["pht"].settings
    return subprocess.run([sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(settings.data_dir),
                           "--database-url", settings.database_url, *command],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_a_known_token_is_looked_up_once(client, token, queries, every_announcement_heard):  # noqa: F811
    for _ in range(5):
        assert tasks_status(client, token) == 200
    assert len(token_lookups(queries)) == 2  # once: the sites' table, then the researchers'
    assert tasks_status(client, "pht_unknown") == 401
    assert tasks_status(client, "pht_unknown") == 401
    assert len(token_lookups(queries)) == 2 + 2 * len(store.PRINCIPALS)  # an unknown token is never remembered


def test_a_token_revoked_in_this_process_is_refused_at_once(app, client, token, every_announcement_heard):  # noqa: F811
    assert tasks_status(client, token) == 200
    store.revoke_principal(app.extensions["pht"].engine, store.RESEARCHER, "alice")
    if app.extensions["pht"].relay is None:
        assert tasks_status(client, token) == 401
    else:  # a NOTIFY: heard within moments, from the database
        wait_until(lambda: tasks_status(client, token) == 401, "the revocation is heard")


def test_a_token_the_operator_revokes_or_replaces_is_refused_at_once(
        app, client, token, every_announcement_heard):  # noqa: F811
    on_sqlite = app.extensions["pht"].relay is None
    refused = (lambda: tasks_status(client, token) == 401)
    assert tasks_status(client, token) == 200
    operator_command(app, "revoke", "alice")
    if on_sqlite:
        assert refused()
    else:
        wait_until(refused, "the revocation is heard")

    new_token = operator_command(app, "rotate-token", "alice")
    assert tasks_status(client, new_token) == 200
    assert tasks_status(client, token) == 401
    operator_command(app, "rotate-token", "alice")  # and once more, while the second token is remembered
    if on_sqlite:
        assert tasks_status(client, new_token) == 401
    else:
        wait_until(lambda: tasks_status(client, new_token) == 401, "the replacement is heard")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_replica_that_cannot_hear_of_changes_remembers_nothing(app, client, token, queries):  # noqa: F811
    # Its relay is not listening (nothing started it): it cannot know of another replica's revocation.
    for _ in range(3):
        assert tasks_status(client, token) == 200
    assert len(token_lookups(queries)) == 3 * 2  # each time: sites first, then researchers
    store.revoke_principal(app.extensions["pht"].engine, store.RESEARCHER, "alice")
    assert tasks_status(client, token) == 401
