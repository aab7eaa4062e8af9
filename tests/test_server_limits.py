"""What the registry's and the FileService's server (master/server.py) does against slow and hoarding clients,
against real server processes: the Slowloris attack (half-sent requests that hold a socket each), stalled
bodies, idle kept-alive connections, connection caps, and body limits checked before the body is read.

The limits are set short here (1 s) so that the tests stay fast. All clients of a test come from loopback;
a second loopback address (127.0.0.2) plays another client where a test needs one. The server's limits
do not depend on the database, so these tests use SQLite only.
"""

import concurrent.futures
import hashlib
import http.client
import io
import select
import socket
import subprocess
import sys
import time

import pytest
import requests
import sqlalchemy as sa

from master import store
from master.server import ServerLimits, connection_ceiling, refusal_reason
from scripts.federation import free_port, register_directly, wait_until_answers
from tests.conftest import ROOT
from tests.test_registry_server import IMAGE, RegistryProcess, bearer

FILESERVICE = str(ROOT / "fileservice" / "FileService.py")
# Every deadline at 1 s, so that a test sees each one pass; the caps stay at their defaults unless a test sets them.
SHORT_DEADLINES = ("--header-seconds", "1", "--stall-seconds", "1", "--keep-alive-seconds", "1")
GIVE_UP_SECONDS = 30  # only for failing tests: how long to wait for the server to act before saying it did not
ANOTHER_CLIENT = "127.0.0.2"


@pytest.fixture
def start_registry(tmp_path):
    started = []

    def start(*serve_options):
        registry = RegistryProcess(tmp_path / "data", f"sqlite:///{tmp_path / 'registry.sqlite'}",
                                   tmp_path / f"registry-{len(started)}.log", *serve_options)
        registry.database_url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def fileservice(tmp_path):
    port = free_port()
    base = [sys.executable, FILESERVICE, "--data-dir", str(tmp_path / "ttp")]
    with open(tmp_path / "fileservice.log", "wb") as log:
        process = subprocess.Popen([*base, "serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--max-file-bytes", "1000", *SHORT_DEADLINES], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/health", process, "the FileService")
        sender = subprocess.run([*base, "add-sender", "hospital-a"], capture_output=True, text=True, check=True)
        yield port, sender.stdout.strip()
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_until(condition, what, timeout=GIVE_UP_SECONDS):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def connect(port, source="127.0.0.1"):
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def read_until_closed(connection, trickle=b""):
    """Everything the server sends until it closes the connection; meanwhile, if trickle is given, it is
    sent again every 0.2 s, as a slow client sends a byte every so often. Fails if the server still holds
    the connection after GIVE_UP_SECONDS."""
    received = b""
    give_up_at = time.monotonic() + GIVE_UP_SECONDS
    while time.monotonic() < give_up_at:
        readable, _, _ = select.select([connection], [], [], 0.2)
        try:
            if not readable:
                if trickle:
                    connection.send(trickle)
                continue
            data = connection.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return received
        if not data:
            return received
        received += data
    raise AssertionError(f"the server still holds the connection after {GIVE_UP_SECONDS} s; "
                         f"it sent {received[:200]!r}")


def read_head(connection):
    """The status line and headers of the server's answer, without waiting for the connection to close."""
    received = b""
    connection.settimeout(GIVE_UP_SECONDS)
    while b"\r\n\r\n" not in received:
        data = connection.recv(65536)
        assert data, f"the server closed the connection before it answered; it sent {received!r}"
        received += data
    return received


def health_from(port, source):
    """GET /health on a new connection from the source address: its status, or the error that ended it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except OSError as error:  # a refused connection may be reset before its 503 is read
        return type(error).__name__
    finally:
        connection.close()


def kept_alive_after_health(port):
    """A connection that has had its /health answered and waits, kept alive, for its next request. Asked
    again after a 503: the connection of the test's startup check may not have been counted off yet."""
    give_up_at = time.monotonic() + GIVE_UP_SECONDS
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            if response.status == 200 and not response.will_close:
                return connection
            outcome = response.status
        except ConnectionError as error:  # refused: the reset came before the 503 was read
            outcome = type(error).__name__
        connection.close()
        assert outcome in (503, "ConnectionResetError") and time.monotonic() < give_up_at, f"/health: {outcome}"


def site_with_a_run(registry):
    site = register_directly(registry.database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(registry.database_url, store.RESEARCHER, ["alice"])["alice"]
    requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                  json={"image": IMAGE, "input": "{}"}).raise_for_status()
    run = requests.post(registry.url + "/api/site/claim", json={}, headers=bearer(site), timeout=10).json()
    return site, researcher, run


def sites_seen(registry):
    """How many sites have made a claim: one that has is waiting in its long-poll, or got its run."""
    engine = sa.create_engine(registry.database_url)
    try:
        with engine.connect() as conn:
            return conn.scalar(sa.select(sa.func.count()).where(store.sites.c.last_seen_at.is_not(None)))
    finally:
        engine.dispose()


def request_head(method, path, headers):
    lines = [f"{method} {path} HTTP/1.1", "Host: registry", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- Slowloris: a request's line and headers must be in within one deadline -------------------------------

def test_headers_that_trickle_in_are_cut_off_at_the_header_deadline(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    trickling = connect(registry.port)
    trickling.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    silent = connect(registry.port)

    # A byte every 0.2 s would keep a per-read timeout of 1 s happy for ever; the deadline is for the whole head.
    assert read_until_closed(trickling, trickle=b"a") == b""
    assert read_until_closed(silent) == b""
    assert "request line and headers not in within 1 s (--header-seconds)" in registry.log()
    assert requests.get(registry.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("header_bytes, status", [(60_000, b"200"), (100_000, b"400")])
def test_headers_past_64_kib_in_all_are_refused(start_registry, header_bytes, status):
    """gevent alone took 100 header lines of 64 KiB each: 6.4 MB held for every connection sending its head."""
    registry = start_registry(*SHORT_DEADLINES)
    padding = {f"X-Pad-{number}": "p" * 4990 for number in range(header_bytes // 5000)}  # 100 lines are gevent's cap
    connection = connect(registry.port)
    connection.sendall(request_head("GET", "/health", {**padding, "Connection": "close"}))
    assert read_head(connection).startswith(b"HTTP/1.1 " + status)


def test_an_idle_kept_alive_connection_is_closed(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    connection = kept_alive_after_health(registry.port)
    connection.request("GET", "/health")  # kept alive: a second request on it is answered
    assert connection.getresponse().read() == b'{"status":"ok"}\n'

    assert read_until_closed(connection.sock) == b""


# --- request bodies: stalls, limits, and what the application leaves unread ---------------------------------

def test_a_stalled_request_body_is_dropped_with_408(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    site = register_directly(registry.database_url, store.SITE, ["hospital-a"])["hospital-a"]
    stalled = connect(registry.port)
    stalled.sendall(request_head("POST", "/api/site/claim", {
        **bearer(site), "Content-Type": "application/json", "Content-Length": "100"}) + b'{"wait_')

    answer = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_slow_but_moving_upload_succeeds(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    site, researcher, run = site_with_a_run(registry)
    piece = bytes(range(256)) * 1024  # 256 KiB
    pieces = 16
    expected = hashlib.sha256(piece * pieces).hexdigest()

    class SlowFile:
        """4 MiB, a piece every 0.3 s: slower in all than every deadline, but never stalled for one."""
        def __init__(self):
            self.unread = io.BytesIO(piece * pieces)

        def __len__(self):
            return len(piece) * pieces

        def read(self, size=8192):
            offset = self.unread.tell()
            if offset % len(piece) == 0:
                time.sleep(0.3)
            return self.unread.read(min(size, len(piece) - offset % len(piece)))

    def chunked():
        for _ in range(pieces):
            time.sleep(0.3)
            yield piece

    headers = {**bearer(site), "X-Lease-Id": run["lease_id"], "X-Content-SHA256": expected}
    for kind, body in (("output", SlowFile()), ("log", chunked())):  # with a Content-Length, and chunked
        uploaded = requests.put(f"{registry.url}/api/site/runs/{run['id']}/{kind}", data=body, headers=headers,
                                timeout=60)
        assert uploaded.status_code == 200, uploaded.text
        assert uploaded.json() == {"sha256": expected, "size": len(piece) * pieces}


def test_a_body_nobody_reads_does_not_keep_the_connection(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    trickling = connect(registry.port)
    trickling.sendall(request_head("GET", "/health", {"Content-Length": str(10 ** 9)}))

    # /health reads no body; the server drops what the client goes on sending only for the header deadline.
    answer = read_until_closed(trickling, trickle=b"x")
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_a_client_that_stops_taking_its_answer_is_dropped(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    site, researcher, run = site_with_a_run(registry)
    body = b"\0" * (32 * 1024 * 1024)
    requests.put(f"{registry.url}/api/site/runs/{run['id']}/output", data=body, timeout=60, headers={
        **bearer(site), "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(body).hexdigest(),
    }).raise_for_status()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that the server's writes block soon
    reader.settimeout(10)
    reader.connect(("127.0.0.1", registry.port))
    reader.sendall(request_head("GET", f"/api/runs/{run['id']}/output", bearer(researcher)))

    wait_until(lambda: "an answer the client took nothing of for 1 s (--stall-seconds)" in registry.log(),
               "the server drops the download that nobody reads")
    assert 0 < len(read_until_closed(reader)) < len(body)


def request_to(endpoint, site, researcher, run):
    """(method, path, token, headers) of a request with a body to one kind of endpoint."""
    return {
        "upload": ("PUT", f"/api/site/runs/{run['id']}/output", site,
                   {"X-Lease-Id": run["lease_id"], "X-Content-SHA256": "0" * 64}),
        "researcher JSON": ("POST", "/api/tasks", researcher, {"Content-Type": "application/json"}),
        "site JSON": ("POST", "/api/site/claim", site, {"Content-Type": "application/json"}),
    }[endpoint]


@pytest.mark.parametrize("endpoint", ["upload", "researcher JSON", "site JSON"])
def test_an_oversized_content_length_is_refused_before_the_body_is_read(start_registry, endpoint):
    registry = start_registry("--max-input-bytes", "1000", "--max-result-bytes", "1000", *SHORT_DEADLINES)
    method, path, token, extra = request_to(endpoint, *site_with_a_run(registry))
    client = connect(registry.port)
    client.sendall(request_head(method, path, {**bearer(token), **extra, "Content-Length": str(10 ** 12)}))

    answer = read_head(client)  # not a byte of the body sent
    assert answer.startswith(b"HTTP/1.1 413 "), answer


@pytest.mark.parametrize("endpoint", ["upload", "researcher JSON"])
def test_a_chunked_body_is_cut_off_at_the_limit_while_it_is_read(start_registry, endpoint):
    registry = start_registry("--max-input-bytes", "1000", "--max-result-bytes", "1000", *SHORT_DEADLINES)
    method, path, token, extra = request_to(endpoint, *site_with_a_run(registry))
    client = connect(registry.port)
    client.sendall(request_head(method, path, {**bearer(token), **extra, "Transfer-Encoding": "chunked"}))
    client.sendall(chunk(b'{"input": "' + b"x" * 10_000))  # past both limits; and the body never ends

    answer = read_head(client)  # a server that waited for the body's end would answer 408, or never
    assert answer.startswith(b"HTTP/1.1 413 "), answer


def test_the_fileservice_checks_its_limit_before_and_while_reading(fileservice):
    port, sender = fileservice
    headers = {**bearer(sender), "X-Content-SHA256": "0" * 64}
    declared = connect(port)
    declared.sendall(request_head("PUT", "/files/big.age", {**headers, "Content-Length": str(10 ** 12)}))
    chunked = connect(port)
    chunked.sendall(request_head("PUT", "/files/big.age", {**headers, "Transfer-Encoding": "chunked"}))
    chunked.sendall(chunk(b"x" * 10_000))

    for client in (declared, chunked):
        answer = read_head(client)
        assert answer.startswith(b"HTTP/1.1 413 "), answer


# --- caps on connections ------------------------------------------------------------------------------------

def test_the_idle_cap_per_address_refuses_the_extra_connection(start_registry):
    registry = start_registry("--max-idle-per-address", "3")
    held = [kept_alive_after_health(registry.port) for _ in range(3)]

    extra = connect(registry.port)
    answer = read_until_closed(extra)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: " in answer, answer
    assert health_from(registry.port, ANOTHER_CLIENT) == 200
    assert "already held 3 idle connections (--max-idle-per-address" in registry.log()

    held.pop().close()
    wait_until(lambda: health_from(registry.port, "127.0.0.1") == 200,
               "127.0.0.1 is served again once it holds fewer idle connections than the cap")


def test_the_idle_cap_does_not_count_requests_in_progress(start_registry):
    registry = start_registry("--max-idle-per-address", "1")
    sites = register_directly(registry.database_url, store.SITE, [f"site-{i}" for i in range(5)])
    researcher = register_directly(registry.database_url, store.RESEARCHER, ["alice"])["alice"]

    def post_until_admitted(path, token, body):
        # A new connection counts as idle until its headers are in, and a closed one until the server sees
        # it closed: one may meet another, and a 503.
        while True:
            response = requests.post(registry.url + path, json=body, headers=bearer(token), timeout=90)
            if response.status_code != 503:
                return response
            time.sleep(0.05)

    with concurrent.futures.ThreadPoolExecutor(len(sites)) as pool:
        long_polls = []
        for token in sites.values():
            long_polls.append(pool.submit(post_until_admitted, "/api/site/claim", token, {"wait_seconds": 60}))
            wait_until(lambda: sites_seen(registry) == len(long_polls), "the site's long-poll waits at the server")
        # Five requests in progress from 127.0.0.1 and an idle cap of one: a new connection is still served.
        assert health_from(registry.port, "127.0.0.1") == 200
        post_until_admitted("/api/tasks", researcher, {"image": IMAGE, "input": "{}"}).raise_for_status()
        assert [poll.result().status_code for poll in long_polls] == [200] * len(sites)


def test_the_total_cap_refuses_the_extra_connection(start_registry):
    registry = start_registry("--max-connections", "3")
    held = [kept_alive_after_health(registry.port) for _ in range(3)]

    answer = read_until_closed(connect(registry.port, ANOTHER_CLIENT))
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert "3 connections were open (--max-connections" in registry.log()
    held.pop().close()
    wait_until(lambda: health_from(registry.port, ANOTHER_CLIENT) == 200, "a connection is served again")


# --- long-polls are the server answering late: no deadline applies while the application waits ---------

def test_long_polls_outlast_every_deadline(start_registry):
    registry = start_registry(*SHORT_DEADLINES)
    site = register_directly(registry.database_url, store.SITE, ["hospital-a"])["hospital-a"]
    researcher = register_directly(registry.database_url, store.RESEARCHER, ["alice"])["alice"]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        claim = pool.submit(requests.post, registry.url + "/api/site/claim", json={"wait_seconds": 30},
                            headers=bearer(site), timeout=60)
        wait_until(lambda: sites_seen(registry) == 1, "the site's long-poll waits at the server")
        # A silent connection opened after the long-poll began is closed at the header deadline: by then
        # the long-poll has waited longer than that (and than the stall and keep-alive deadlines, as long).
        assert read_until_closed(connect(registry.port)) == b""
        task = requests.post(registry.url + "/api/tasks", headers=bearer(researcher), timeout=10,
                             json={"image": IMAGE, "input": "{}", "sites": ["hospital-a"]}).json()
        assert claim.result().status_code == 200 and claim.result().json()["task_id"] == task["id"]

    # The researcher's long-poll: the run is claimed, not ended, so the task is still active after 3 s.
    waited = requests.get(f"{registry.url}/api/tasks/{task['id']}", params={"wait_seconds": 3},
                          headers=bearer(researcher), timeout=30)
    assert waited.status_code == 200 and waited.json()["status"] == "active"


# --- the decisions, without a server ---------------------------------------------------------------------

def test_a_refusal_names_the_option_that_caps():
    limits = ServerLimits(max_connections=10, max_idle_per_address=2)
    assert refusal_reason(limits, open_connections=9, idle_from_address=1) is None
    assert "10 connections were open (--max-connections)" in refusal_reason(limits, 10, 0)
    assert "already held 2 idle connections (--max-idle-per-address" in refusal_reason(limits, 5, 2)
    assert refusal_reason(ServerLimits(max_idle_per_address=0), 5, 100_000) is None


def test_the_connection_cap_leaves_room_for_other_open_files():
    assert connection_ceiling(65536) == 65536 - 6553  # a tenth kept for files
    assert connection_ceiling(400) == 300  # but at least 100
    assert connection_ceiling(50) == 1
