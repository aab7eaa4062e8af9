"""The registry's boundaries, as the attacks on it found them open: revoking ends what the revoked left
behind, names and digests have one shape, and the operator's commands, files and logs give nothing away.

Each test is one verified attack; it failed on the code before the fix.
"""

import os
import socket
import stat
import subprocess

import pytest
import requests
import sqlalchemy as sa

from master import auth, lifecycle, store
from master.app import Settings, create_app
from master.json_bodies import nesting_problem
from tests.conftest import _bearer_for as conftest_bearer
from tests.test_registry_api import IMAGE, claim, park, post_task, start
from tests.test_registry_server import bearer, start_registry  # noqa: F401 (a fixture)

DIGEST = "sha256:" + "d" * 64

# For a test of the registry process that the database has no part in (how it reads a request, what it logs, a
# command's message for a name refused before any write): SQLite only. Whatever touches the store stays on both.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def alice(make_researcher):
    return make_researcher("alice")


@pytest.fixture
def engine(app):
    return app.extensions["pht"].engine


def runs_of(client, researcher, task_id):
    return {run["site"]: run for run in client.get(f"/api/tasks/{task_id}", headers=researcher).json["runs"]}


# --- revoking ends what the revoked left unfinished ------------------------------------------------

def test_revoking_a_researcher_cancels_their_unfinished_runs_and_no_site_claims_them(client, engine, alice,
                                                                                     make_site):
    hospital_a, hospital_b, hospital_c = make_site("hospital-a"), make_site("hospital-b"), make_site("hospital-c")
    task_id = post_task(client, alice, sites=["hospital-a", "hospital-b", "hospital-c"]).json["id"]
    running = claim(client, hospital_a).json
    start(client, hospital_a, running)
    waiting = claim(client, hospital_b).json
    assert park(client, hospital_b, waiting, image_digest=DIGEST).status_code == 204

    ended = store.revoke_principal(engine, store.RESEARCHER, "alice")

    assert len(ended) == 3
    assert claim(client, hospital_c).status_code == 204  # its pending run is gone from the queue
    answer = client.post(f"/api/site/runs/{running['id']}/heartbeat", headers=hospital_a,
                         json={"lease_id": running["lease_id"]})
    assert answer.json["status"] == lifecycle.CANCELLED  # the site stops the container at its next heartbeat
    with engine.connect() as conn:
        alice_id = conn.execute(sa.select(store.researchers.c.id).where(store.researchers.c.name == "alice")).scalar()
    runs = store.get_task(engine, task_id, alice_id)["runs"]
    assert {run["status"] for run in runs} == {lifecycle.CANCELLED}
    assert all(run["reason"] == store.RESEARCHER_REVOKED and run["reason"].startswith("revoked") for run in runs)


def test_revoking_a_site_fails_its_unfinished_runs(client, engine, alice, make_site):
    hospital_a, _ = make_site("hospital-a"), make_site("hospital-b")
    first = post_task(client, alice, sites=["hospital-a", "hospital-b"]).json["id"]
    second = post_task(client, alice, sites=["hospital-a"]).json["id"]
    start(client, hospital_a, claim(client, hospital_a).json)

    store.revoke_principal(engine, store.SITE, "hospital-a")

    assert runs_of(client, alice, first)["hospital-a"]["status"] == lifecycle.FAILED
    assert runs_of(client, alice, first)["hospital-a"]["reason"] == store.SITE_REVOKED
    assert runs_of(client, alice, first)["hospital-b"]["status"] == lifecycle.PENDING  # another site's run goes on
    assert runs_of(client, alice, second)["hospital-a"]["status"] == lifecycle.FAILED
    assert client.get(f"/api/tasks/{second}", headers=alice).json["status"] == lifecycle.TaskStatus.FINISHED_WITH_ERRORS


def test_a_lease_running_out_as_its_researcher_is_revoked_does_not_bring_the_run_back(tmp_path):
    """Attack (SQLite, which locks no rows): the sweep read a lapsed lease, a revocation cancelled the run,
    and the sweep then wrote it back to pending, for a site to claim. Here the revocation is made to
    land exactly between the sweep's read and its write."""
    app = create_app(Settings(data_dir=tmp_path / "registry"))  # the embedded SQLite store
    engine, client = app.extensions["pht"].engine, app.test_client()
    alice = conftest_bearer(app, store.RESEARCHER, "alice")
    hospital = conftest_bearer(app, store.SITE, "hospital-a")
    post_task(client, alice, sites=["hospital-a"])
    run = claim(client, hospital).json
    with engine.begin() as conn:
        conn.execute(store.runs.update().values(lease_expires_at=0))
    revoked = []

    @sa.event.listens_for(engine, "after_cursor_execute")
    def revoke_once_the_sweep_has_read(conn, cursor, statement, parameters, context, executemany):
        if "runs.attempts" in statement and not revoked:
            revoked.append(store.revoke_principal(engine, store.RESEARCHER, "alice"))

    assert store.expire_overdue_leases(engine) == []
    sa.event.remove(engine, "after_cursor_execute", revoke_once_the_sweep_has_read)
    assert revoked == [[run["id"]]]
    with engine.connect() as conn:
        assert conn.execute(sa.select(store.runs.c.status)).scalar() == lifecycle.CANCELLED
    assert claim(client, hospital).status_code == 204
    engine.dispose()


def test_a_replaced_token_works_and_the_old_one_does_not(client, engine, make_site):
    old = make_site("hospital-a")
    store.revoke_principal(engine, store.SITE, "hospital-a")
    new_token = auth.new_token()
    store.replace_token(engine, store.SITE, "hospital-a", auth.hash_token(new_token))
    assert claim(client, old).status_code == 401
    assert claim(client, {"Authorization": f"Bearer {new_token}"}).status_code == 204


# --- the operator's commands -----------------------------------------------------------------------

def test_revoke_asks_which_one_when_a_site_and_a_researcher_share_a_name(start_registry):  # noqa: F811
    registry = start_registry()
    # Side by side: neither changes what the other sees, and each is a process start of about a second.
    site_token, researcher_token = [done.stdout.strip() for done in registry.admin_side_by_side(
        ["create-site", "shared"], ["create-researcher", "shared"])]

    ambiguous = registry.admin("revoke", "shared")
    assert ambiguous.returncode == 2 and "--site or --researcher" in ambiguous.stderr

    revoked = registry.admin("revoke", "shared", "--site")
    assert revoked.returncode == 0 and "revoked site shared" in revoked.stdout
    assert requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site_token)).status_code == 401
    assert requests.get(registry.url + "/api/tasks", headers=bearer(researcher_token)).status_code == 200


def test_revoke_takes_no_token_as_an_argument_but_from_standard_input(start_registry):  # noqa: F811
    registry = start_registry()
    token = registry.admin("create-researcher", "alice").stdout.strip()

    as_argument = registry.admin("revoke", token)
    assert as_argument.returncode == 2 and "revoke --token-stdin" in as_argument.stderr
    assert token not in as_argument.stderr and token not in as_argument.stdout

    from_stdin = subprocess.run([*registry.base, "revoke", "--token-stdin"], input=token + "\n",
                                capture_output=True, text=True, timeout=60)
    assert from_stdin.returncode == 0 and "revoked researcher alice" in from_stdin.stdout
    assert "revoked" in registry.admin("list-researchers").stdout


def test_rotate_token_gives_a_revoked_site_a_working_token(start_registry):  # noqa: F811
    registry = start_registry()
    old = registry.admin("create-site", "hospital-a").stdout.strip()
    assert registry.admin("revoke", "hospital-a").returncode == 0
    again = registry.admin("create-site", "hospital-a")
    assert again.returncode == 1 and "rotate-token --site hospital-a" in again.stderr

    rotated = registry.admin("rotate-token", "hospital-a")
    assert rotated.returncode == 0
    new = rotated.stdout.strip()
    assert new != old
    assert requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(old)).status_code == 401
    assert requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(new)).status_code == 204
    assert "hospital-a\tactive" in registry.admin("list-sites").stdout


@pytest.mark.parametrize("name", ["../../x", "/abs/path", "Hospital-A", "hospital_a", "hospital-a\n", "-a", "a-",
                                  "", "a" * 64, "x\x1b[2J", "é"])
def test_a_site_or_researcher_name_must_be_a_dns_label(engine, name):
    for role in (store.SITE, store.RESEARCHER):
        with pytest.raises(store.Invalid, match=f"{role} name .* is not allowed: use 1 to 63 lowercase letters"):
            store.create_principal(engine, role, name, auth.hash_token(auth.new_token()))


@SQLITE_ONLY  # the name is refused before the store is written; the rule's own test runs on both databases
def test_create_site_names_the_rule_it_broke(start_registry):  # noqa: F811
    registry = start_registry()
    made = registry.admin("create-site", "../../x")
    assert made.returncode == 1
    assert "is not allowed: use 1 to 63 lowercase letters, digits and '-'" in made.stderr
    assert registry.admin("list-sites").stdout == ""


# --- what sites and researchers send has one shape --------------------------------------------------

def test_an_image_reference_with_a_trailing_newline_is_refused(client, alice, make_site):
    make_site("hospital-a")
    answer = post_task(client, alice, image=IMAGE + "\n")
    assert answer.status_code == 422 and "image" in answer.json["detail"]["json"]
    assert post_task(client, alice, image=IMAGE).status_code == 201


@pytest.mark.parametrize("digest", ["anything at all", "sha256:" + "d" * 63, "sha256:" + "D" * 64, DIGEST + "\n",
                                    "sha512:" + "d" * 64])
def test_a_site_reports_only_a_real_digest(client, alice, make_site, digest):
    hospital = make_site("hospital-a")
    post_task(client, alice)
    run = claim(client, hospital).json
    answer = client.post(f"/api/site/runs/{run['id']}/start", headers=hospital,
                         json={"lease_id": run["lease_id"], "image_digest": digest})
    assert answer.status_code == 422 and "image_digest" in answer.json["detail"]["json"]


@pytest.mark.parametrize("field, value", [("name", "../../etc/passwd"), ("name", "x\n2026 INFO forged"),
                                          ("name", ".hidden"), ("recipient", "a/b"), ("recipient", "ttp\n"),
                                          ("sha256", "d" * 64 + "\n")])
def test_a_delivery_receipt_follows_the_fileservices_rule(client, alice, make_site, field, value):
    hospital = make_site("hospital-a")
    post_task(client, alice)
    run = claim(client, hospital).json
    receipt = {"lease_id": run["lease_id"], "recipient": "ttp", "name": "linkage.csv.age", "size": 1,
               "sha256": "d" * 64, field: value}
    answer = client.post(f"/api/site/runs/{run['id']}/deliveries", headers=hospital, json=receipt)
    assert answer.status_code == 422 and field in answer.json["detail"]["json"]


def nested_lists(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_deeper_than_the_api_reads_is_named():
    assert nesting_problem(nested_lists(32)) is None
    assert "nested more than 32 levels" in nesting_problem(nested_lists(33))
    assert "nested more than 32 levels" in nesting_problem({"a": [1, {"b": nested_lists(31)}]})
    assert nesting_problem({"a": [1, {"b": nested_lists(29)}]}) is None


@SQLITE_ONLY  # answered before any token is looked up
def test_a_json_body_without_a_token_is_not_read(start_registry):  # noqa: F811
    """Attack: a body trickled (or 8 MB of `[[],[],...]`) with no token once held a connection, or the
    registry's one process, while it was read and parsed before anyone asked for the token. Now the
    answer, 401, comes while the body is still unfinished."""
    registry = start_registry()
    with socket.create_connection(("127.0.0.1", registry.port), timeout=30) as connection:
        connection.sendall(b"POST /api/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n5\r\n[[[[[\r\n")
        assert connection.recv(100).startswith(b"HTTP/1.1 401")


# --- files and logs ---------------------------------------------------------------------------------

def test_the_data_folder_and_database_are_the_registrys_alone(tmp_path):
    data_dir = tmp_path / "registry-data"
    data_dir.mkdir(mode=0o755)
    old_umask = os.umask(0o022)
    try:
        app = create_app(Settings(data_dir=data_dir))
        store.create_principal(app.extensions["pht"].engine, store.SITE, "hospital-a", "0" * 64)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.glob("registry.sqlite*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert (data_dir / "registry.sqlite-wal").exists()
    app.extensions["pht"].engine.dispose()


@SQLITE_ONLY  # a request line to no endpoint, and the log
def test_a_newline_in_a_url_forges_no_line_in_the_registrys_log(start_registry):  # noqa: F811
    registry = start_registry()
    forged = "2026-01-01 00:00:00,000 INFO pht.registry: run 1 completed"
    with socket.create_connection(("127.0.0.1", registry.port)) as connection:
        connection.sendall(f"GET /api/x%0a{forged.replace(' ', '%20')} HTTP/1.1\r\nHost: x\r\n"
                           "Connection: close\r\n\r\n".encode())
        assert connection.recv(100).startswith(b"HTTP/1.1 404")
    with socket.create_connection(("127.0.0.1", registry.port)) as connection:  # and the next request's line
        connection.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        connection.recv(100)
    # Each request's line is logged before its answer is sent.
    log = registry.log()
    assert not any(line.startswith(forged) for line in log.splitlines())
    assert f"/api/x\\x0a{forged}" in log
