"""The per-run SPARQL gateway in this process, against a real Oxigraph (client/sparql_gateway.py).

No Docker: a RunGateway listens on its Unix socket in a temporary run folder and forwards to an
`oxigraph serve` (read-write, so a refused update is the gateway's own refusal) on 127.0.0.1.
The tests talk HTTP to the socket as the relay would, and read what the query log recorded and
what the store holds. Limits are small, so each limit is reached in a few queries.
"""

import csv
import hashlib
import http.client
import http.server
import io
import json
import logging
import os
import socket
import subprocess
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
import requests

from client import sparql_gateway
from client.site_config import SPARQL_GATEWAY_DEFAULTS, SparqlGatewaySettings
from client.sparql_gateway import (SOCKET_NAME, QueryLog, RunGateway, Upstream, endpoint_problem, query_log_path,
                                   read_query_log, summarize)
from client.sparql_queries import REFUSED
from scripts.federation import OXIGRAPH, free_port, wait_until_answers
from scripts.processes import stop_process

EX = "http://example.org/pht/"
PATIENTS = [("p1", 34, 'Ann "},{" O\'Neil'), ("p2", 51, "Bob <result>\nline"), ("p3", 67, "Cé, 😀"),
            ("p4", 45, "D\\\\\\\""), ("p5", 29, "Eve\r\n,\t")]
FILLER = 60  # more triples, so that an answer of everything is larger than a small max_response_bytes
PATIENT_QUERY = f"PREFIX ex: <{EX}> SELECT ?p ?age ?name WHERE {{ ?p a ex:Patient ; ex:age ?age ; ex:name ?name }} " \
                f"ORDER BY ?age"
EVERYTHING = "SELECT * WHERE { ?s ?p ?o }"
COUNT_ALL = "SELECT (COUNT(*) AS ?n) WHERE { ?s ?p ?o }"
SLOW = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"
JSON_TYPE = "application/sparql-results+json"
RUN, TASK = 7, 3


# --- a real Oxigraph on loopback ---------------------------------------------------------

def literal(value):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def patients_ntriples():
    lines = []
    for name, age, label in PATIENTS:
        lines += [f"<{EX}{name}> <http://www.w3.org/1999/02/22-rdf-syntax-ns#type> <{EX}Patient> .",
                  f'<{EX}{name}> <{EX}age> "{age}"^^<http://www.w3.org/2001/XMLSchema#integer> .',
                  f"<{EX}{name}> <{EX}name> {literal(label)} ."]
    lines += [f'<{EX}filler/{index}> <{EX}note> "filler triple number {index}" .' for index in range(FILLER)]
    return "\n".join(lines) + "\n"


def plain_ntriples(count):
    return "".join(f'<{EX}s{index}> <{EX}p> "{index}" .\n' for index in range(count))


@dataclass
class Oxigraph:
    process: subprocess.Popen
    base: str

    @property
    def url(self):
        return self.base + "/query"

    def ask_directly(self, query):
        response = requests.post(self.url, data={"query": query}, headers={"Accept": JSON_TYPE}, timeout=10)
        response.raise_for_status()
        return response.json()

    def update_directly(self, update):
        requests.post(self.base + "/update", data={"update": update}, timeout=10).raise_for_status()

    def stop(self):
        stop_process(self.process)


def start_oxigraph(folder, ntriples):
    folder.mkdir(parents=True)
    (folder / "data.nt").write_text(ntriples, encoding="utf-8")
    subprocess.run([OXIGRAPH, "load", "--location", str(folder / "store"), "--file", str(folder / "data.nt")],
                   check=True, capture_output=True)
    port = free_port()
    log = open(folder / "oxigraph.log", "wb")
    process = subprocess.Popen([OXIGRAPH, "serve", "--location", str(folder / "store"), "--bind", f"127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    log.close()
    server = Oxigraph(process, f"http://127.0.0.1:{port}")
    try:
        wait_until_answers(server.base + "/", process, "oxigraph serve")
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def oxigraph(tmp_path_factory):
    server = start_oxigraph(tmp_path_factory.mktemp("sparql") / "oxigraph", patients_ntriples())
    yield server
    server.stop()


@pytest.fixture
def slow_oxigraph(tmp_path):
    """Its own Oxigraph: the slow query keeps it busy for seconds after the gateway gave up."""
    server = start_oxigraph(tmp_path / "slow-oxigraph", plain_ntriples(400))
    yield server
    server.stop()


def closed_port_url():
    return f"http://127.0.0.1:{free_port()}/query"


# --- the gateway, and HTTP over its Unix socket -------------------------------------------

def wait_until(condition, what, timeout=10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def connect_unix(path, timeout=10):
    """A socket connected to path, through its folder's descriptor: tmp_path may be longer than 107 bytes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        # Blocking: a non-blocking connect to a Unix socket whose backlog is full fails at once (EAGAIN).
        sock.connect(f"/proc/self/fd/{folder}/{path.name}")
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(folder)
    return sock


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("gateway", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = connect_unix(self.path, self.timeout)


@dataclass
class Answer:
    status: int
    reason: str
    content_type: str
    body: bytes


class Gateway:
    """A RunGateway of run 7 in tmp_path, and what a test needs to talk to it and read its log."""

    def __init__(self, tmp_path, endpoint_url, **limits):
        self.folder = tmp_path / "work" / "runs" / str(RUN) / "gateway"
        self.log_path = query_log_path(tmp_path / "work", RUN)
        self.settings = SparqlGatewaySettings(**{**SPARQL_GATEWAY_DEFAULTS, "query_timeout_seconds": 10,
                                                 "max_response_bytes": 1_000_000, "max_queries": 100,
                                                 "max_query_bytes": 10_000, **limits})
        self.upstream = Upstream(endpoint_url)
        self.run_gateway = RunGateway(RUN, TASK, self.folder, self.upstream, self.settings,
                                      QueryLog(self.log_path, RUN, TASK, self.settings.record_query_text))
        self.run_gateway.open()

    @property
    def socket_path(self):
        return self.folder / SOCKET_NAME

    def connection(self, timeout=10):
        return UnixHTTPConnection(self.socket_path, timeout)

    def request(self, method="GET", params=None, body=None, headers=None, connection=None):
        """The answer, once the gateway has also recorded the query (it records after the answer's end)."""
        recorded = len(self.entries())
        connection = connection or self.connection()
        connection.request(method, "/sparql" + (f"?{urlencode(params)}" if params else ""), body=body,
                           headers=headers or {})
        response = connection.getresponse()
        answer = Answer(response.status, response.reason, response.getheader("Content-Type"), response.read())
        self.wait_for_entries(recorded + 1)
        return answer

    def query(self, text, accept=JSON_TYPE, **more):
        return self.request(params={"query": text}, headers={"Accept": accept}, **more)

    def entries(self):
        return list(read_query_log(self.log_path))

    def wait_for_entries(self, count):
        wait_until(lambda: len(self.entries()) >= count, f"the query log has {count} entries")
        return self.entries()

    def close(self):
        self.run_gateway.close()


@pytest.fixture(scope="module")
def close_later():
    """close() waits up to the server's poll interval (0.5 s): gateways close while the next tests run,
    and every one has closed before the module ends."""
    closing = []

    def close(gateway):
        thread = threading.Thread(target=gateway.close, name="closing a test's gateway")
        thread.start()
        closing.append(thread)

    yield close
    for thread in closing:
        thread.join(timeout=10)
        assert not thread.is_alive(), "a gateway did not close within 10 s"


@pytest.fixture
def open_gateway(tmp_path, oxigraph, close_later):
    opened = []

    def open_(endpoint_url=None, **limits):
        gateway = Gateway(tmp_path, endpoint_url or oxigraph.url, **limits)
        opened.append(gateway)
        return gateway

    yield open_
    for gateway in opened:
        close_later(gateway)


def raw_exchange(path, data):
    """Send data as it is, then read what comes back until the gateway closes the connection."""
    with connect_unix(path) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and closed before reading it all: its answer is still there to read
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def last(gateway):
    return gateway.entries()[-1]


def assert_refused(answer, status):
    assert answer.status == status, answer
    assert answer.reason.startswith(REFUSED) and answer.body.decode().startswith(REFUSED)


# --- answers, in every format, recorded exactly -------------------------------------------

def rows_of(answer, accept):
    """(patient IRI, age, name) rows, read with each format's own parser."""
    text = answer.body.decode("utf-8")
    if accept == JSON_TYPE:
        return [(row["p"]["value"], int(row["age"]["value"]), row["name"]["value"])
                for row in json.loads(text)["results"]["bindings"]]
    if accept == "application/sparql-results+xml":
        ns = {"r": "http://www.w3.org/2005/sparql-results#"}
        return [(result.find("r:binding[@name='p']/r:uri", ns).text,
                 int(result.find("r:binding[@name='age']/r:literal", ns).text),
                 result.find("r:binding[@name='name']/r:literal", ns).text)
                for result in ElementTree.fromstring(answer.body).findall(".//r:result", ns)]
    if accept == "text/csv":
        return [(row[0], int(row[1]), row[2]) for row in list(csv.reader(io.StringIO(text, newline="")))[1:]]
    lines = text.split("\n")[1:-1]  # TSV: RDF terms as in Turtle
    return [(p[1:-1], int(age.split("^^")[0] if "^^" in age else age),
             json.loads(name)) for p, age, name in (line.split("\t") for line in lines)]


@pytest.mark.parametrize("accept", [JSON_TYPE, "application/sparql-results+xml", "text/csv",
                                    "text/tab-separated-values"])
def test_a_select_is_answered_in_each_format_and_recorded(open_gateway, accept):
    gateway = open_gateway()
    answer = gateway.query(PATIENT_QUERY, accept)
    assert answer.status == 200 and answer.content_type.startswith(accept)
    expected = sorted(((f"{EX}{name}", age, label) for name, age, label in PATIENTS), key=lambda row: row[1])
    if accept == "application/sparql-results+xml":
        # Oxigraph writes a \r as it is, and XML parsers read a written \r\n as \n.
        expected = [(p, age, label.replace("\r\n", "\n")) for p, age, label in expected]
    assert rows_of(answer, accept) == expected
    assert last(gateway) == {
        **last(gateway), "run": RUN, "task": TASK, "form": "SELECT", "query": PATIENT_QUERY,
        "query_sha256": hashlib.sha256(PATIENT_QUERY.encode()).hexdigest(), "status": "answered",
        "http_status": 200, "reason": None, "rows": len(PATIENTS), "bytes": len(answer.body)}
    assert last(gateway)["duration_ms"] >= 0 and last(gateway)["at"].endswith("+00:00")


def test_each_request_form_is_answered_alike(open_gateway):
    gateway = open_gateway()
    accept = {"Accept": JSON_TYPE}
    answers = [
        gateway.query(PATIENT_QUERY),
        gateway.request("POST", body=urlencode({"query": PATIENT_QUERY, "format": "json"}),
                        headers={**accept, "Content-Type": "application/x-www-form-urlencoded"}),
        gateway.request("POST", params={"output": "json"}, body=PATIENT_QUERY.encode(),
                        headers={**accept, "Content-Type": "application/sparql-query; charset=utf-8"}),
    ]
    assert [answer.status for answer in answers] == [200, 200, 200]
    assert answers[0].body == answers[1].body == answers[2].body
    assert [(entry["status"], entry["rows"]) for entry in gateway.entries()] == [("answered", len(PATIENTS))] * 3


def test_ask_construct_and_describe_are_answered_and_recorded(open_gateway):
    gateway = open_gateway()
    ask = gateway.query(f"ASK {{ <{EX}p1> ?p ?o }}")
    assert (ask.status, json.loads(ask.body)["boolean"]) == (200, True)
    construct = gateway.query(f"CONSTRUCT WHERE {{ ?p a <{EX}Patient> }}", accept="application/n-triples")
    assert construct.status == 200 and construct.body.count(b"\n") == len(PATIENTS)
    describe = gateway.query(f"DESCRIBE <{EX}p2>", accept="text/turtle")
    assert describe.status == 200 and b"Bob" in describe.body
    assert [(entry["form"], entry["status"], entry["rows"]) for entry in gateway.entries()] == [
        ("ASK", "answered", None), ("CONSTRUCT", "answered", len(PATIENTS)), ("DESCRIBE", "answered", None)]


def test_two_queries_on_one_kept_alive_connection(open_gateway):
    gateway = open_gateway()
    connection = gateway.connection()
    first = gateway.query(PATIENT_QUERY, connection=connection)
    sock = connection.sock
    second = gateway.query(COUNT_ALL, connection=connection)
    assert (first.status, second.status) == (200, 200)
    assert connection.sock is sock and sock is not None, "the gateway closed a kept-alive connection"
    assert json.loads(second.body)["results"]["bindings"][0]["n"]["value"] == str(3 * len(PATIENTS) + FILLER)
    connection.close()


def test_connections_that_go_before_their_answer_leave_no_traceback(open_gateway, caplog):
    """An algorithm that sends a bad request and hangs up at once leaves the gateway an answer it cannot send (a
    broken pipe): its doing, not a runner bug, so no traceback in the site's log, whatever the number of them."""
    gateway = open_gateway()
    for _ in range(20):
        sock = connect_unix(gateway.socket_path)
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        sock.close()
    assert gateway.query(COUNT_ALL).status == 200  # the gateway answers on, each of those connections over
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text[:3000]


def test_a_closed_gateway_answers_nothing_more_on_a_connection_kept_alive(open_gateway):
    """Its run has ended: a relay kept for the session's next run must not go on asking through it."""
    gateway = open_gateway()
    connection = gateway.connection()
    assert gateway.query(COUNT_ALL, connection=connection).status == 200
    gateway.close()
    connection.request("GET", "/sparql?" + urlencode({"query": COUNT_ALL}), headers={"Accept": JSON_TYPE})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        connection.getresponse()
    connection.close()
    assert len(gateway.entries()) == 1, "a request after the close was recorded"


# --- refusals: nothing reaches the store --------------------------------------------------

INSERT = f'INSERT DATA {{ <{EX}x> <{EX}written> "through the gateway" }}'
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
UPDATES = {
    "GET update=": dict(params={"update": INSERT}),
    "POST form update=": dict(method="POST", body=urlencode({"update": INSERT}), headers=FORM),
    "POST sparql-update": dict(method="POST", body=INSERT.encode(),
                               headers={"Content-Type": "application/sparql-update"}),
    "GET query=INSERT DATA": dict(params={"query": INSERT}),
    "POST form query=DELETE WHERE": dict(method="POST", body=urlencode({"query": "DELETE WHERE { ?s ?p ?o }"}),
                                         headers=FORM),
    "POST sparql-query DROP ALL": dict(method="POST", body=b"DROP ALL",
                                       headers={"Content-Type": "application/sparql-query"}),
    "GET query=CLEAR DEFAULT": dict(params={"query": "CLEAR DEFAULT"}),
    "GET query=LOAD": dict(params={"query": f"LOAD <{closed_port_url()}>"}),
    "GET query=CREATE": dict(params={"query": f"CREATE GRAPH <{EX}g>"}),
}


def test_updates_in_every_form_are_refused_and_the_store_is_unchanged(open_gateway, oxigraph):
    # The store itself takes updates: a refusal is the gateway's own.
    oxigraph.update_directly("INSERT DATA { GRAPH <urn:pht-test:writable> { <urn:a> <urn:b> <urn:c> } }")
    assert oxigraph.ask_directly("ASK { GRAPH <urn:pht-test:writable> { ?s ?p ?o } }")["boolean"] is True
    oxigraph.update_directly("DROP GRAPH <urn:pht-test:writable>")
    gateway = open_gateway()
    before = oxigraph.ask_directly(EVERYTHING)["results"]["bindings"]
    for how, request in UPDATES.items():
        answer = gateway.request(**request)
        assert_refused(answer, 403)
        assert "updates are not allowed" in answer.reason, how
    after = oxigraph.ask_directly(EVERYTHING)["results"]["bindings"]
    assert sorted(map(json.dumps, after)) == sorted(map(json.dumps, before))
    assert [(entry["status"], entry["http_status"], entry["form"]) for entry in gateway.entries()] == \
        [("refused", 403, None)] * len(UPDATES)


def test_other_refusals_get_their_status_and_are_recorded(open_gateway):
    gateway = open_gateway(max_query_bytes=3000)
    service = f"SELECT * WHERE {{ SERVICE <{closed_port_url()}> {{ ?s ?p ?o }} }}"
    cases = [
        (dict(params={"query": service}), 403),
        (dict(params={"query": "not a query"}), 400),
        (dict(params={"query": "SELECT * WHERE " + "{" * 2000 + "}" * 900}), 400),
        (dict(params={"format": "json"}), 400),
        (dict(params=[("query", COUNT_ALL), ("query", COUNT_ALL)]), 400),
        (dict(method="PUT"), 405),
        (dict(method="DELETE"), 405),
        (dict(method="POST", body=EVERYTHING.encode(), headers={"Content-Type": "text/plain"}), 415),
        (dict(params={"query": EVERYTHING + " #" + "x" * 3000}), 413),
    ]
    for request, status in cases:
        assert_refused(gateway.request(**request), status)
    assert [(entry["status"], entry["http_status"]) for entry in gateway.entries()] == \
        [("refused", status) for _, status in cases]
    assert gateway.query(COUNT_ALL).status == 200


def test_an_oversized_post_gets_a_413_its_client_can_read(open_gateway):
    # The gateway refuses on the Content-Length and closes without reading the body; a client still
    # sending it (http.client, urllib and SPARQLWrapper send the body after the headers) must still
    # get the 413 and its reason, not a broken pipe.
    gateway = open_gateway(max_query_bytes=100_000)
    body = (EVERYTHING + " #" + "x" * 1_000_000).encode()
    try:
        answer = gateway.request("POST", body=body, headers={"Content-Type": "application/sparql-query"})
    except OSError as error:
        pytest.fail(f"the client could not read the gateway's 413: {error!r}")
    assert_refused(answer, 413)


def test_after_a_refusal_the_next_query_on_the_same_connection_is_answered(open_gateway):
    # The gateway closes the connection after a refusal; unless it says so (Connection: close), a
    # keep-alive client sends its next query into the closed connection.
    gateway = open_gateway()
    connection = gateway.connection()
    assert gateway.query("DROP ALL", connection=connection).status == 403
    try:
        assert gateway.query(COUNT_ALL, connection=connection).status == 200
    except (OSError, http.client.HTTPException) as error:
        pytest.fail(f"the gateway closed the connection after its refusal without saying Connection: close ({error!r})")
    finally:
        connection.close()


def test_an_error_of_the_endpoint_is_passed_on_and_recorded_as_failed(open_gateway):
    gateway = open_gateway()
    unknown_prefix = gateway.query("SELECT * WHERE { ?s undefined:p ?o }")  # rdflib parses it, Oxigraph does not
    not_acceptable = gateway.query("CONSTRUCT WHERE { ?s ?p ?o }", accept="application/sparql-results+json")
    assert (unknown_prefix.status, not_acceptable.status) == (400, 406)
    assert [(entry["status"], entry["http_status"], entry["rows"], entry["reason"]) for entry in gateway.entries()] == [
        ("failed", 400, None, "the site's SPARQL endpoint answered 400"),
        ("failed", 406, None, "the site's SPARQL endpoint answered 406")]
    assert [entry["bytes"] for entry in gateway.entries()] == [len(unknown_prefix.body), len(not_acceptable.body)]


def test_a_post_without_content_length_is_refused_with_411(open_gateway):
    gateway = open_gateway()
    received = raw_exchange(gateway.socket_path, b"POST /sparql HTTP/1.1\r\nHost: gateway\r\n"
                                                 b"Content-Type: application/sparql-query\r\n"
                                                 b"Transfer-Encoding: chunked\r\n\r\n3\r\nASK\r\n0\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 411 " + REFUSED.encode())
    entry = gateway.wait_for_entries(1)[-1]
    assert (entry["status"], entry["http_status"]) == ("refused", 411)


def test_a_content_length_that_is_not_a_number_is_refused_and_recorded(open_gateway):
    # '²' (latin-1 0xB2) passes str.isdigit() but not int().
    gateway = open_gateway()
    received = raw_exchange(gateway.socket_path, b"POST /sparql HTTP/1.1\r\nHost: gateway\r\n"
                                                 b"Content-Type: application/sparql-query\r\n"
                                                 b"Content-Length: \xb2\r\n\r\nAS")
    assert received[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 411"), f"the gateway answered {received[:200]!r}"
    assert len(gateway.wait_for_entries(1)) == gateway.run_gateway.requests == 1


# --- SERVICE never reaches another endpoint -----------------------------------------------

class OtherEndpoint(http.server.ThreadingHTTPServer):
    """Another SPARQL endpoint on loopback, that records whoever calls it."""

    def __init__(self):
        self.calls = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.calls.append(self.requestline)
            body = json.dumps({"head": {"vars": ["a"]}, "results": {"bindings": [
                {"a": {"type": "literal", "value": "from the other endpoint"}}]}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", JSON_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def log_message(self, format, *args):  # noqa: A002
            pass


@pytest.fixture
def other_endpoint():
    server = OtherEndpoint()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def hidden_services(url):
    """SERVICE that rdflib reads as part of a comment or a string, and Oxigraph as a SERVICE call."""
    pattern = f"SERVICE <{url}> {{ ?a ?b ?c }}"
    return {
        "a comment ended by \\r": f"SELECT * WHERE {{ ?s ?p ?o # note\r {pattern} \n}}",
        "\\u0022 in strings": f'SELECT * WHERE {{ {{ BIND("\\u0022" AS ?x) }} UNION {{ {pattern} }} '
                              f'UNION {{ BIND("\\u0022" AS ?y) }} }}',
    }


def test_service_never_reaches_another_endpoint(open_gateway, other_endpoint):
    gateway = open_gateway()
    url = f"http://127.0.0.1:{other_endpoint.server_address[1]}/sparql"
    assert_refused(gateway.query(f"SELECT * WHERE {{ SERVICE <{url}> {{ ?a ?b ?c }} }}"), 403)
    answers = {how: gateway.query(text) for how, text in hidden_services(url).items()}
    leaked = {how: answer.body[:300] for how, answer in answers.items() if b"from the other endpoint" in answer.body}
    assert other_endpoint.calls == [] and leaked == {}, \
        f"the store called {url} through the gateway: {other_endpoint.calls}; answers: {leaked}"
    assert all(400 <= answer.status < 500 for answer in answers.values())


# --- limits -------------------------------------------------------------------------------

def test_after_max_queries_the_next_gets_429_and_the_gateway_closes(open_gateway):
    gateway = open_gateway(max_queries=3)
    for _ in range(3):
        assert gateway.query(COUNT_ALL).status == 200
    assert_refused(gateway.query(COUNT_ALL), 429)
    wait_until(lambda: not gateway.socket_path.exists(), "the gateway removed its socket after the 429")
    with pytest.raises(OSError):
        gateway.query(COUNT_ALL)
    entries = gateway.entries()
    assert len(entries) == 4
    assert [entry["status"] for entry in entries] == ["answered"] * 3 + ["refused"]
    assert entries[-1]["http_status"] == 429 and "limit of 3 queries" in entries[-1]["reason"]


def test_after_max_queries_even_a_malformed_request_gets_429_and_the_gateway_closes(open_gateway):
    # Past the limit, nothing more is judged: a POST without Content-Length (411 within the limit) is a
    # request like any other, and the gateway must still close, or the run's log grows without end.
    gateway = open_gateway(max_queries=2)
    for _ in range(2):
        assert gateway.query(COUNT_ALL).status == 200
    received = raw_exchange(gateway.socket_path, b"POST /sparql HTTP/1.1\r\nHost: gateway\r\n"
                                                 b"Content-Type: application/sparql-query\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 429 "), f"past the limit, the gateway answered {received[:120]!r}"
    wait_until(lambda: not gateway.socket_path.exists(), "the gateway removed its socket after the 429")
    assert len(gateway.entries()) == 3


def test_refused_queries_count_toward_max_queries(open_gateway):
    gateway = open_gateway(max_queries=2)
    assert gateway.query("DROP ALL").status == 403
    assert gateway.query("not a query").status == 400
    assert gateway.query(COUNT_ALL).status == 429


def test_an_answer_over_max_response_bytes_is_cut_and_the_client_sees_it_incomplete(open_gateway, oxigraph):
    gateway = open_gateway(max_response_bytes=2000)
    whole = oxigraph.ask_directly(EVERYTHING)
    assert len(json.dumps(whole)) > 2000
    connection = gateway.connection()
    connection.request("GET", "/sparql?" + urlencode({"query": EVERYTHING}), headers={"Accept": JSON_TYPE})
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()
    entry = gateway.wait_for_entries(1)[-1]
    assert (entry["status"], entry["rows"], entry["http_status"]) == ("cut", None, 200)
    assert entry["bytes"] <= 2000 and "limit of 2000 bytes" in entry["reason"]
    assert gateway.query(COUNT_ALL).status == 200, "the gateway stopped answering after a cut"


def test_a_slow_query_times_out_and_the_gateway_answers_the_next(open_gateway, slow_oxigraph):
    gateway = open_gateway(slow_oxigraph.url, query_timeout_seconds=1)
    started = time.monotonic()
    try:
        answer = gateway.query(SLOW)
        outcome = answer.status
    except http.client.IncompleteRead:
        outcome = "cut"
    assert outcome in (504, "cut")
    assert time.monotonic() - started < 5
    entry = gateway.wait_for_entries(1)[-1]
    assert (entry["status"], entry["http_status"]) in (("failed", 504), ("cut", 200)), entry
    assert entry["form"] == "SELECT" and entry["rows"] is None
    quick = gateway.query("ASK { ?s ?p ?o }")
    assert quick.status == 200 and json.loads(quick.body)["boolean"] is True


def test_without_record_query_text_only_the_hash_is_kept(open_gateway):
    gateway = open_gateway(record_query_text=False)
    gateway.query(PATIENT_QUERY)
    gateway.query("DROP ALL")
    gateway.query("SELECT\x1b[31m broken")
    entries = gateway.entries()
    assert [entry["query"] for entry in entries] == [None, None, None]
    assert [entry["query_sha256"] for entry in entries] == [
        hashlib.sha256(text.encode()).hexdigest() for text in (PATIENT_QUERY, "DROP ALL", "SELECT\x1b[31m broken")]
    assert PATIENT_QUERY.split()[0].encode() not in gateway.log_path.read_bytes()


def test_the_log_keeps_the_start_of_a_long_query_and_the_hash_of_all_of_it(open_gateway):
    gateway = open_gateway(max_query_bytes=100_000)
    text = COUNT_ALL + " # " + "x" * 5000
    assert gateway.query(text).status == 200
    entry = last(gateway)
    assert entry["query"] == text[:2000] and entry["query_chars"] == len(text)
    assert entry["query_sha256"] == hashlib.sha256(text.encode()).hexdigest()


def test_the_log_is_one_ascii_line_per_query_whatever_the_query(open_gateway):
    gateway = open_gateway()
    texts = ['SELECT * WHERE { ?s ?p "é 😀" }', 'SELECT * WHERE { ?s ?p """\x1b[2J\r\n\u2028""" }',
             "\x1b[2J\r\nDROP ALL\x00"]
    assert [gateway.query(text).status for text in texts] == [200, 400, 400]
    lines = gateway.log_path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4
    assert all(32 <= byte < 127 for line in lines for byte in line)
    assert gateway.entries()[0]["query"] == texts[0]
    assert "\x1b[2J" in gateway.entries()[2]["query"]


# --- a restart ----------------------------------------------------------------------------

def test_a_new_gateway_on_the_same_folder_answers_and_counts_the_queries_before(tmp_path, oxigraph):
    first = Gateway(tmp_path, oxigraph.url, max_queries=3)
    assert first.query(COUNT_ALL).status == 200
    assert first.query("DROP ALL").status == 403
    first.close()
    assert not first.socket_path.exists()
    second = Gateway(tmp_path, oxigraph.url, max_queries=3)
    try:
        assert second.socket_path == first.socket_path and second.log_path == first.log_path
        assert second.query(COUNT_ALL).status == 200
        assert_refused(second.query(COUNT_ALL), 429)
        assert [entry["http_status"] for entry in second.entries()] == [200, 403, 200, 429]
        wait_until(lambda: not second.socket_path.exists(), "the gateway removed its socket after the 429")
    finally:
        second.close()
    third = Gateway(tmp_path, oxigraph.url, max_queries=3)
    assert not third.socket_path.exists(), "a run that used up its queries got its gateway back"
    third.close()


def test_a_gateway_opens_over_the_socket_a_killed_runner_left(tmp_path, open_gateway):
    folder = tmp_path / "work" / "runs" / str(RUN) / "gateway"
    folder.mkdir(parents=True)
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    with socket.socket(socket.AF_UNIX) as stale:  # bound, then closed without being removed
        stale.bind(f"/proc/self/fd/{descriptor}/{SOCKET_NAME}")
    os.close(descriptor)
    assert (folder / SOCKET_NAME).is_socket()
    gateway = open_gateway()
    assert gateway.query(COUNT_ALL).status == 200
    assert (gateway.socket_path.stat().st_mode & 0o777, gateway.folder.stat().st_mode & 0o777) == (0o666, 0o755)


# --- connections that misbehave ----------------------------------------------------------

def test_idle_connections_do_not_stop_the_gateway(open_gateway, monkeypatch):
    # _Handler.timeout is bound to IDLE_SECONDS when the module loads: lower both.
    monkeypatch.setattr(sparql_gateway, "IDLE_SECONDS", 0.3)
    monkeypatch.setattr(sparql_gateway._Handler, "timeout", 0.3)
    gateway = open_gateway()
    idle = [connect_unix(gateway.socket_path) for _ in range(20)]
    try:
        answer = gateway.query(COUNT_ALL, connection=gateway.connection(timeout=20))
        assert answer.status == 200
        assert all(sock.recv(1) == b"" for sock in idle), "an idle connection was not closed"
    finally:
        for sock in idle:
            sock.close()


def test_connections_closed_without_a_request_do_not_stop_the_gateway(open_gateway):
    gateway = open_gateway()
    for _ in range(20):
        connect_unix(gateway.socket_path).close()
    half_sent = [connect_unix(gateway.socket_path) for _ in range(10)]
    for sock in half_sent:
        sock.sendall(b"GE")  # not even a method: the HTTP server refuses it before the gateway sees it
        sock.close()
    assert gateway.query(COUNT_ALL).status == 200
    assert len(gateway.entries()) == 1


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /sparql?query=ASK%7B%7D HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n", 431),
    (b"GET /sparql?query=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n", 414),
    (b"GET /sparql HTTP/1.1\r\n" + b"X-Many: a\r\n" * 200 + b"\r\n", 431),
], ids=["a 1 MB header line", "a 1 MB request line", "200 headers"])
def test_oversized_requests_get_a_4xx_and_the_gateway_stays_up(open_gateway, request_bytes, status):
    gateway = open_gateway()
    received = raw_exchange(gateway.socket_path, request_bytes)
    assert received.startswith(b"HTTP/1.1 %d " % status), received[:200]
    assert gateway.query(COUNT_ALL).status == 200


# --- the endpoint down ---------------------------------------------------------------------

def test_a_closed_endpoint_gives_502_recorded_as_failed(open_gateway):
    gateway = open_gateway(closed_port_url())
    answer = gateway.query(COUNT_ALL)
    assert answer.status == 502 and "did not answer" in answer.reason
    entry = last(gateway)
    assert (entry["status"], entry["http_status"], entry["form"], entry["bytes"]) == ("failed", 502, "SELECT", 0)


def test_an_endpoint_that_stops_gives_502(tmp_path, open_gateway):
    oxigraph = start_oxigraph(tmp_path / "stopping", plain_ntriples(3))
    try:
        gateway = open_gateway(oxigraph.url)
        assert gateway.query(COUNT_ALL).status == 200
        oxigraph.stop()
        assert gateway.query(COUNT_ALL).status == 502
        assert [entry["status"] for entry in gateway.entries()] == ["answered", "failed"]
    finally:
        oxigraph.stop()


def test_endpoint_problem_names_what_is_wrong(oxigraph):
    assert endpoint_problem(Upstream(oxigraph.url)) is None
    assert endpoint_problem(Upstream(closed_port_url()), timeout_seconds=2) == "connection refused"
    assert endpoint_problem(Upstream(oxigraph.base + "/no-such-path")).startswith("it answered 4")


# --- the record a researcher gets ---------------------------------------------------------

def test_summarize_counts_queries_bytes_and_refusals(open_gateway):
    gateway = open_gateway()
    answers = [gateway.query(PATIENT_QUERY), gateway.query("DROP ALL"), gateway.query(COUNT_ALL),
               gateway.query("SELECT nonsense")]
    assert summarize(read_query_log(gateway.log_path)) == {
        "queries": 4, "bytes": len(answers[0].body) + len(answers[2].body), "refused": 2}


def test_read_query_log_skips_a_line_cut_by_a_crash_and_a_missing_log_is_empty(tmp_path):
    path = tmp_path / "sparql-queries" / "9.jsonl"
    assert list(read_query_log(path)) == [] and summarize([]) == {"queries": 0, "bytes": 0, "refused": 0}
    log = QueryLog(path, 9, 1, True)
    log.record(form="ASK", text="ASK {}", sha256="x", status="answered", http_status=200, reason=None, rows=None,
               sent=26, started=time.monotonic())
    with open(path, "a", encoding="ascii") as cut:
        cut.write('{"at": "2026-01-01T00:00:00', )
    assert [entry["bytes"] for entry in read_query_log(path)] == [26]
    assert QueryLog(path, 9, 1, True).entries_before == 1
    assert query_log_path(tmp_path, "9") == path
