"""The registry as an operator runs it: `python master/TaskMaster.py`, a real gevent server process."""

import concurrent.futures
import hashlib
import subprocess
import sys
import threading
import time

import pytest
import requests
import sqlalchemy as sa

from master import store
from scripts.federation import free_port, register_directly, wait_until_answers
from tests.conftest import ROOT

TASKMASTER = str(ROOT / "master" / "TaskMaster.py")
IMAGE = "127.0.0.1:5050/pht/patient-count:latest"


class RegistryProcess:
    def __init__(self, data_dir, database_url, log_path, *serve_options, tls=None):
        """tls: {"cert", "key", "ca"} (PEM files) to serve HTTPS, verified against the ca."""
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log_path, self.data_dir = log_path, data_dir
        self.base = [sys.executable, TASKMASTER, "--data-dir", str(data_dir), "--database-url", database_url]
        tls_options = ["--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"])] if tls else []
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.base, "serve", "--host", "127.0.0.1", "--port", str(self.port), *tls_options, *serve_options],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until_answers(self.url + "/health", self.process, "the registry", ca_bundle=tls and tls["ca"])

    def admin(self, *command):
        return subprocess.run([*self.base, *command], capture_output=True, text=True, timeout=60)

    def admin_side_by_side(self, *commands):
        """Several operator commands at once (for commands that do not change what the others see)."""
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda command: self.admin(*command), commands))

    def log(self):
        return self.log_path.read_text()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def start_registry(tmp_path, database_url):
    started = []

    def start(*serve_options):
        registry = RegistryProcess(tmp_path / "data", database_url, tmp_path / f"registry-{len(started)}.log",
                                   *serve_options)
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


# For a test of the server process that the database has no part in (an upload refused as it streams, the log's
# lines): SQLite only. Whatever the store decides stays on both databases.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_operator_commands(start_registry):
    registry = start_registry()
    created = registry.admin("create-site", "hospital-a")
    assert created.returncode == 0
    token = created.stdout.strip()
    assert token.startswith("pht_")
    # Neither of these changes what the other sees: side by side, as each is a process start of about a second.
    duplicate, listed = registry.admin_side_by_side(["create-site", "hospital-a"], ["list-sites"])
    assert duplicate.returncode != 0
    assert duplicate.stderr.strip().splitlines()[-1] == (
        "Error: site 'hospital-a' already exists; choose another name, or give it a new token with: "
        "rotate-token --site hospital-a")
    assert "hospital-a\tactive\tlast seen never" in listed.stdout

    claim = lambda: requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(token), timeout=10)
    assert claim().status_code == 204
    assert registry.admin("revoke", "hospital-a").stdout.strip() == "revoked site hospital-a; 0 unfinished run(s) failed"
    assert claim().status_code == 401
    listed, unknown = registry.admin_side_by_side(["list-sites"], ["revoke", "nobody"])
    assert "hospital-a\trevoked" in listed.stdout
    assert unknown.returncode != 0 and "no site or researcher is called 'nobody'" in unknown.stderr


def test_hundreds_of_waiting_long_polls_do_not_block_the_server(start_registry, database_url):
    registry = start_registry()
    waiting_sites = 300
    site_tokens = register_directly(database_url, store.SITE, [f"site-{i:03d}" for i in range(waiting_sites)])
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    answered = {}

    def long_poll(name):
        started = time.monotonic()
        response = requests.post(registry.url + "/api/site/claim", json={"wait_seconds": 30},
                                 headers=bearer(site_tokens[name]), timeout=60)
        answered[name] = (response.status_code, time.monotonic() - started)

    pollers = [threading.Thread(target=long_poll, args=(name,)) for name in site_tokens]
    for poller in pollers:
        poller.start()
    wait_until_every_site_is_seen(database_url, waiting_sites)  # every poll is now parked at the server
    assert answered == {}

    health_started = time.monotonic()
    assert requests.get(registry.url + "/health", timeout=5).status_code == 200
    health_seconds = time.monotonic() - health_started
    posted_at = time.monotonic()
    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}", "sites": ["site-123"]}).raise_for_status()
    while "site-123" not in answered and time.monotonic() - posted_at < 10:
        time.sleep(0.01)

    assert answered.get("site-123", (None,))[0] == 200
    assert len(answered) == 1, "only the site that got work may answer early"
    # With a small fixed thread pool both of these would wait for long-polls to time out.
    assert health_seconds < 2
    assert time.monotonic() - posted_at < 5

    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}"}).raise_for_status()  # wakes all others
    for poller in pollers:
        poller.join(timeout=30)
    assert len(answered) == waiting_sites
    assert {status for status, _ in answered.values()} == {200}


def wait_until_every_site_is_seen(database_url, count, timeout=30):
    """Until count sites have claimed (a claim writes down that its site was seen, then waits for work)."""
    engine = sa.create_engine(database_url)
    seen = sa.select(sa.func.count()).select_from(store.sites).where(store.sites.c.last_seen_at.is_not(None))
    deadline = time.monotonic() + timeout
    try:
        while True:
            with engine.connect() as conn:
                if conn.execute(seen).scalar() >= count:
                    return
            assert time.monotonic() < deadline, f"not within {timeout} s: {count} sites claim"
            time.sleep(0.05)
    finally:
        engine.dispose()


def test_two_registries_on_one_database_never_hand_out_a_run_twice(start_registry, database_url):
    first, second = start_registry(), start_registry()
    site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    tasks = 40
    for _ in range(tasks):
        requests.post(first.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                      json={"image": IMAGE, "input": "{}"}).raise_for_status()

    def claim_until_empty(url):
        claimed = []
        with requests.Session() as http:
            while True:
                response = http.post(url + "/api/site/claim", json={}, headers=bearer(site), timeout=30)
                if response.status_code == 204:
                    return claimed
                response.raise_for_status()
                claimed.append(response.json()["id"])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        runners = [pool.submit(claim_until_empty, registry.url) for registry in (first, second) * 4]
        claimed = [run_id for runner in runners for run_id in runner.result()]
    assert sorted(claimed) == list(range(1, tasks + 1))


def test_a_lapsed_lease_is_requeued_even_when_no_site_polls(start_registry, database_url):
    registry = start_registry("--lease-seconds", "2")
    site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    task = requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                         json={"image": IMAGE, "input": "{}"}).json()
    requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site), timeout=10).raise_for_status()

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        run = requests.get(f"{registry.url}/api/tasks/{task['id']}", headers=bearer(researcher), timeout=10).json()["runs"][0]
        if run["status"] == "pending":
            break
        time.sleep(0.2)
    assert run["status"] == "pending" and run["attempts"] == 1
    assert "run 1 lease expired; run is now pending" in registry.log()


def test_chunked_upload_streams_through_and_downloads_intact(start_registry, database_url):
    registry = start_registry()
    site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}"}).raise_for_status()
    run = requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site), timeout=10).json()

    block = bytes(range(256)) * 4096  # 1 MiB
    blocks = 64
    expected = hashlib.sha256(block * blocks).hexdigest()
    uploaded = requests.put(
        f"{registry.url}/api/site/runs/{run['id']}/output", data=(block for _ in range(blocks)), timeout=60,
        headers={**bearer(site), "X-Lease-Id": run["lease_id"], "X-Content-SHA256": expected})
    assert uploaded.status_code == 200, uploaded.text
    assert uploaded.json() == {"sha256": expected, "size": len(block) * blocks}

    digest = hashlib.sha256()
    with requests.get(f"{registry.url}/api/runs/{run['id']}/output", headers=bearer(researcher),
                      stream=True, timeout=60) as download:
        for chunk in download.iter_content(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == expected


@SQLITE_ONLY  # the limit holds while the body streams in, before the store hears of it
def test_upload_over_the_limit_is_refused_and_leaves_nothing(start_registry, database_url, tmp_path):
    registry = start_registry("--max-result-bytes", "1000")
    site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}"}).raise_for_status()
    run = requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site), timeout=10).json()
    body = b"x" * 5000
    response = requests.put(
        f"{registry.url}/api/site/runs/{run['id']}/output", data=iter([body]), timeout=30,
        headers={**bearer(site), "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(body).hexdigest()})
    assert response.status_code == 413
    assert [p for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()] == []


@SQLITE_ONLY  # what the log says of requests and changes; the changes themselves are tested on both
def test_every_request_and_state_change_is_logged_with_ids(start_registry, database_url):
    registry = start_registry()
    site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}"}).raise_for_status()
    requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site), timeout=10).raise_for_status()
    log = registry.log()
    assert "POST /api/tasks -> 201" in log
    assert "task 1 created by researcher alice for 1 site(s)" in log
    assert "run 1 (task 1) claimed by site hospital-a" in log
