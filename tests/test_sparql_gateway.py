"""The per-run SPARQL gateway, attacked from inside real algorithm containers.

An algorithm reaches the site's data only through the gateway at $SPARQL_ENDPOINT
(http://127.0.0.1:8890/sparql, relayed into a network namespace that has nothing else). It answers
SPARQL 1.1 Protocol queries and refuses everything else: updates, SERVICE, oversized or too many
queries, other methods; it cuts oversized answers and slow queries, and records every query at the
site. The probe image (tests/images/sparql-probe) is driven by each task's input and reports what it
saw; the tests compare that with what the site recorded, what the registry was told and what the
real store holds.

Three sites, one federation: SITE with generous limits (and a store that would accept updates, so a
refusal is the gateway's own), LIMITED with small limits and no query text kept, RESTART whose runner
is killed mid-run. Every task is submitted at once; the tests then read how each ended.
"""

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import threading
import urllib.parse
from datetime import datetime, timezone

import pytest
import requests

from scripts.federation import IMAGE_REGISTRY, PYTHON, ROOT, LocalFederation, free_port
from tests.images import (engine_or_fail, only_run, output_json, pushed_test_image, run_log, run_of,
                          wait_for_runs, wait_until)

SITE = "hospital-a"
LIMITED = "hospital-b"
RESTART = "hospital-c"
GENEROUS = {"query_timeout_seconds": 30, "max_response_bytes": 10_000_000, "max_queries": 1000,
            "max_query_bytes": 100_000, "record_query_text": True}
SMALL = {"query_timeout_seconds": 2, "max_response_bytes": 4096, "max_queries": 5, "max_query_bytes": 1024,
         "record_query_text": False}

GATEWAY = "http://127.0.0.1:8890/sparql"
REFUSED = "refused by this site's SPARQL gateway:"
JSON_RESULTS = "application/sparql-results+json"
N_TRIPLES = "application/n-triples"
LOG_FIELDS = {"at", "run", "task", "form", "query", "query_sha256", "status", "http_status", "reason", "rows",
              "bytes", "duration_ms"}

PHT = "PREFIX pht: <http://example.org/pht/vocab#>\n"
COUNT = PHT + "SELECT (COUNT(?patient) AS ?n) WHERE { ?patient a pht:Patient }"
MARK = "urn:pht-test:"  # what the hostile updates would write, were they let through
INSERT = f'INSERT DATA {{ <{MARK}s> <{MARK}p> "written through the gateway" }}'
# A join that keeps Oxigraph busy for seconds before the first byte of its answer (300 triples ^ 3, twice).
JOIN = "{ ?a ?b ?c . ?d ?e ?f . ?g ?h ?i }"
SLOW = f"SELECT (COUNT(*) AS ?n) WHERE {{ {JOIN} UNION {JOIN} }}"


# --- steps for the probe (see tests/images/sparql-probe) --------------------------------------

def get(name, query, accept=JSON_RESULTS, **more):
    return {"name": name, "do": "http", "method": "GET", "params": {"query": query}, "accept": accept, **more}


def form(name, fields, accept=JSON_RESULTS, **more):
    return {"name": name, "do": "http", "method": "POST", "form": fields, "accept": accept, **more}


def direct(name, body, content_type="application/sparql-query", accept=JSON_RESULTS, **more):
    return {"name": name, "do": "http", "method": "POST", "body": body, "content_type": content_type,
            "accept": accept, **more}


def wrapper(name, query, **more):
    return {"name": name, "do": "sparqlwrapper", "query": query, **more}


def raw(name, timeout=3, **what):
    return {"name": name, "do": "raw", "timeout": timeout, **what}


def sent_text(step):
    """The query (or update) text a step sends, as the gateway should record it."""
    if step["do"] == "sparqlwrapper":
        return step["query"]
    if "params" in step:
        return step["params"]["query"]
    if "form" in step:
        return step["form"].get("update", step["form"].get("query"))
    return step["body"]


def queries_steps(canary):
    """The run whose every query the log tests check: 9 answered, then 3 refused, in this order."""
    return [
        wrapper("sparqlwrapper-count", COUNT),
        get("get-count", COUNT),
        form("form-count", {"query": COUNT}),
        direct("direct-count", COUNT),
        wrapper("ask-true", PHT + "ASK { ?patient a pht:Patient ; pht:age ?age FILTER(?age >= 18) }"),
        wrapper("ask-false", PHT + "ASK { ?patient pht:age ?age FILTER(?age > 200) }"),
        get("construct", PHT + "CONSTRUCT { ?patient pht:age ?age } WHERE { ?patient a pht:Patient ; pht:age ?age }",
            accept=N_TRIPLES),
        form("describe", {"query": "DESCRIBE <http://example.org/pht/hospital-a/patient/1>"}, accept=N_TRIPLES),
        wrapper("select-seven", PHT + "SELECT ?patient ?age WHERE { ?patient pht:age ?age } ORDER BY ?patient LIMIT 7"),
        form("update", {"update": INSERT}),
        get("service", f"SELECT * WHERE {{ SERVICE <{canary}> {{ ?s ?p ?o }} }}"),
        direct("not-sparql", "hello, is this where the patients are?"),
    ]


QUERIES_EXPECTED = ([("answered", 200, "SELECT")] * 4 + [("answered", 200, "ASK")] * 2
                    + [("answered", 200, "CONSTRUCT"), ("answered", 200, "DESCRIBE"), ("answered", 200, "SELECT"),
                       ("refused", 403, None), ("refused", 403, ...), ("refused", 400, None)])


def update_steps(canary):
    """Each must be refused with 403: an update, however it is sent."""
    load = f"http://127.0.0.1:{urllib.parse.urlsplit(canary).port}/patients.nt"
    graph = f"<{MARK}graph>"
    as_query = {
        "insert-data": INSERT,
        "delete-data": PHT + 'DELETE DATA { <http://example.org/pht/hospital-a/patient/1> pht:sex "female" }',
        "delete-where": "DELETE WHERE { ?s ?p ?o }",
        "insert-where": PHT + "INSERT { ?patient pht:age 0 } WHERE { ?patient a pht:Patient }",
        "delete-insert-where": PHT + "DELETE { ?p pht:age ?a } INSERT { ?p pht:age 1 } WHERE { ?p pht:age ?a }",
        "with-delete": f"WITH {graph} DELETE {{ ?s ?p ?o }} WHERE {{ ?s ?p ?o }}",
        "load": f"LOAD <{load}>",
        "load-silent-into": f"LOAD SILENT <{load}> INTO GRAPH {graph}",
        "clear-all": "CLEAR ALL",
        "clear-default": "CLEAR DEFAULT",
        "clear-silent-graph": f"CLEAR SILENT GRAPH {graph}",
        "drop-all": "DROP ALL",
        "create-graph": f"CREATE GRAPH {graph}",
        "add": f"ADD DEFAULT TO {graph}",
        "copy": f"COPY DEFAULT TO {graph}",
        "move": f"MOVE DEFAULT TO {graph}",
        "lowercase": INSERT.replace("INSERT DATA", "insert data"),
        "prologue-first": f"BASE <{MARK}>\n" + PHT + INSERT,
        "comment-first": "# only a question\n" + "DELETE WHERE { ?s ?p ?o }",
        "two-operations": f"CLEAR ALL ;\n{INSERT}",
    }
    steps = []
    for name, text in as_query.items():
        steps.append(form(f"update-as-query-form-{name}", {"query": text}))
    steps += [
        get("update-as-query-get", INSERT),
        direct("update-as-query-direct", "DELETE WHERE { ?s ?p ?o }"),
        form("update-field", {"update": INSERT}),
        form("update-field-with-a-query", {"query": "ASK {}", "update": INSERT}),
        form("update-field-clear", {"update": "CLEAR ALL"}),
        direct("update-content-type", INSERT, content_type="application/sparql-update"),
        direct("update-content-type-charset", INSERT, content_type="application/sparql-update; charset=utf-8"),
        direct("update-content-type-case", INSERT, content_type="Application/SPARQL-Update"),
        direct("update-content-type-a-query", "ASK {}", content_type="application/sparql-update"),
        wrapper("sparqlwrapper-update-form", "DELETE WHERE { ?s ?p ?o }", method="POST"),
        wrapper("sparqlwrapper-update-direct", INSERT, method="POST", request_method="postdirectly"),
    ]
    return steps


def loosely_refused_steps():
    """Updates in forms the protocol has no name for: refused, as 400 or 403."""
    return [
        {"name": "update-param-get", "do": "http", "method": "GET", "params": {"update": INSERT}},
        form("query-then-update", {"query": f"SELECT * WHERE {{ ?s ?p ?o }} ;\n{INSERT}"}),
    ]


def service_steps(canary):
    """Each must be refused with 403: a SERVICE clause, wherever it hides."""
    target = f"<{canary}>"
    base, _, path = canary.rpartition("/")
    body = "{ ?s ?p ?o }"
    queries = {
        "plain": f"SELECT * WHERE {{ SERVICE {target} {body} }}",
        "silent": f"SELECT * WHERE {{ SERVICE SILENT {target} {body} }}",
        "lowercase": f"select * where {{ service {target} {body} }}",
        "mixed-case-no-space": f"SELECT * WHERE {{ SeRvIcE{target}{body} }}",
        "whitespace": f"SELECT * WHERE {{\n\tSERVICE\r\n\t{target}\n{body} }}",
        "comment-between": f"SELECT * WHERE {{ SERVICE # not here\n{target} {body} }}",
        "prefixed-name": f"PREFIX remote: <{base}/>\nSELECT * WHERE {{ SERVICE remote:{path} {body} }}",
        "variable": f"SELECT * WHERE {{ VALUES ?endpoint {{ {target} }} SERVICE ?endpoint {body} }}",
        "optional": PHT + f"SELECT * WHERE {{ ?s a pht:Patient OPTIONAL {{ SERVICE {target} {body} }} }}",
        "subquery": f"SELECT * WHERE {{ {{ SELECT ?s WHERE {{ SERVICE {target} {body} }} }} }}",
        "filter-exists": PHT + f"SELECT * WHERE {{ ?s a pht:Patient FILTER EXISTS {{ SERVICE {target} {body} }} }}",
        "filter-not-exists": PHT + (f"SELECT * WHERE {{ ?s a pht:Patient "
                                    f"FILTER NOT EXISTS {{ SERVICE {target} {body} }} }}"),
        "bind-exists": PHT + f"SELECT * WHERE {{ ?s a pht:Patient BIND(EXISTS {{ SERVICE {target} {body} }} AS ?x) }}",
        "minus": PHT + f"SELECT * WHERE {{ ?s a pht:Patient MINUS {{ SERVICE {target} {body} }} }}",
        "union": PHT + f"SELECT * WHERE {{ {{ ?s a pht:Patient }} UNION {{ SERVICE {target} {body} }} }}",
        "graph": f"SELECT * WHERE {{ GRAPH ?g {{ SERVICE {target} {body} }} }}",
        "deep": PHT + (f"SELECT * WHERE {{ ?s a pht:Patient OPTIONAL {{ {{ SELECT ?s WHERE {{ ?s ?q ?v "
                       f"FILTER NOT EXISTS {{ OPTIONAL {{ SERVICE SILENT {target} {body} }} }} }} }} }} }}"),
        "ask": f"ASK {{ SERVICE {target} {body} }}",
        "construct": f"CONSTRUCT {{ ?s ?p ?o }} WHERE {{ SERVICE {target} {body} }}",
        "describe": f"DESCRIBE ?s WHERE {{ SERVICE {target} {body} }}",
    }
    steps = [get(f"service-get-{name}", text) for name, text in queries.items()]
    steps += [
        form("service-form", {"query": queries["plain"]}),
        direct("service-direct", queries["silent"]),
        wrapper("service-sparqlwrapper", queries["optional"]),
    ]
    return steps


def unicode_escape_steps(canary):
    """SERVICE spelled with a \\u escape: Oxigraph does not read it as SERVICE, so 400 or 403 will do."""
    return [get("service-unicode-escape", f"SELECT * WHERE {{ \\u0053ERVICE <{canary}> {{ ?s ?p ?o }} }}")]


def method_steps():
    return [{"name": f"method-{method}", "do": "http", "method": method, "params": {"query": "ASK {}"},
             **({"body": "ASK {}", "content_type": "application/sparql-query"} if method != "OPTIONS" else {})}
            for method in ("PUT", "DELETE", "PATCH", "OPTIONS")]


def other_path_steps():
    """The store's own write paths, asked for through the gateway: never reached."""
    triple = f'<{MARK}s> <{MARK}p> "through the graph store protocol" .\n'
    return [
        {**form("path-update", {"update": INSERT}), "path": "/update"},
        {**direct("path-update-direct", INSERT, content_type="application/sparql-update"), "path": "/update"},
        {**direct("path-store", triple, content_type=N_TRIPLES), "path": "/store"},
        {**direct("path-store-default", triple, content_type=N_TRIPLES), "path": "/store", "params": {"default": ""}},
        {**direct("path-dot-dot", INSERT, content_type="application/sparql-update"), "path": "/sparql/../update"},
    ]


def http_request(method, path, body, content_type):
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body.encode())}\r\n\r\n{body}")


def hostile_steps():
    """Requests no HTTP client would send, then the same question as before: is it still answered?"""
    ask = "GET /sparql?query=ASK%7B%7D HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    smuggled_update = http_request("POST", "/update", INSERT, "application/sparql-update")
    return [
        get("before", COUNT),
        raw("big-header", big_header=1024 * 1024, timeout=10),
        get("after-big-header", COUNT),
        {"name": "slowloris", "do": "slowloris", "connections": 200, "hold_seconds": 3,
         "during": get("during-slowloris", COUNT, timeout=10)},
        get("after-slowloris", COUNT),
        raw("random-bytes", random_bytes=65536),
        raw("nul-bytes", send="\x00" * 4096),
        raw("tls-hello", send="\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + "\x00" * 64),
        raw("unknown-method", send="BREW /sparql HTCPCP/1.0\r\n\r\n"),
        raw("unknown-version", send=ask.replace("HTTP/1.1", "HTTP/9.9") + "\r\n"),
        raw("header-without-colon", send=ask + "this is no header\r\n\r\n"),
        raw("many-headers", send=ask + "X-A: b\r\n" * 20000 + "\r\n"),
        raw("long-url", send=ask.replace("ASK%7B%7D", "ASK%7B%7D&pad=" + "a" * 200_000) + "\r\n"),
        raw("content-length-huge", send=http_request("POST", "/sparql", "ASK {}", "application/sparql-query")
            .replace("Content-Length: 6", "Content-Length: 99999999999")),
        raw("content-length-negative", send=http_request("POST", "/sparql", "ASK {}", "application/sparql-query")
            .replace("Content-Length: 6", "Content-Length: -6")),
        raw("chunked-invalid", send="POST /sparql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sparql-query"
                                    "\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nASK {}\r\n0\r\n\r\n"),
        raw("smuggle-cl-te", send="POST /sparql HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-"
                                  "urlencoded\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                                  + smuggled_update),
        raw("pipelined-update", send=ask + "\r\n" + smuggled_update),
        raw("pipelined-sparql-update", send=ask + "\r\n" + http_request("POST", "/sparql", INSERT,
                                                                        "application/sparql-update")),
        raw("partial-then-silence", send=ask, half_close=False),
        get("after-everything", COUNT),
    ]


def parallel_steps(canary):
    """An algorithm that asks with many threads at once, as a parallel one would."""
    return [{"name": "counts", "do": "parallel", "threads": 16, "step": get("count", COUNT)},
            {"name": "services", "do": "parallel", "threads": 16,
             "step": get("service", f"SELECT * WHERE {{ OPTIONAL {{ SERVICE <{canary}> {{ ?s ?p ?o }} }} }}")},
            {"name": "updates", "do": "parallel", "threads": 16, "step": direct("update", "DELETE WHERE { ?s ?p ?o }")}]


def loop_step(addresses):
    return {"name": "loop", "do": "loop", "seconds": 90, "interval": 0.3, "query": COUNT, "reach": addresses,
            "stop_file": "/temp/stop", "progress_file": "/temp/attempts.jsonl"}


def limits_count_steps():
    return [get(f"ask-{index}", f"# pht-secret-marker-{index}\nASK {{ ?s ?p ?o }}") for index in range(1, 8)]


def limits_size_steps():
    padding = "# " + "x" * 1500 + "\n"
    return [
        get("small", "ASK { ?s ?p ?o }"),
        get("construct-everything", "CONSTRUCT WHERE { ?s ?p ?o }", accept=N_TRIPLES),
        wrapper("select-everything", "SELECT * WHERE { ?s ?p ?o }"),
        get("long-query-get", padding + "ASK { ?s ?p ?o }"),
        direct("long-query-direct", padding + "ASK { ?s ?p ?o }"),
    ]


def limits_time_steps():
    return [get("slow", SLOW, timeout=60), get("after-slow", "ASK { ?s ?p ?o }")]


# --- the federation, the tasks, and what came of them -------------------------------------------

@pytest.fixture(scope="module")
def canary():
    """A loopback port that must never hear from anyone: the SERVICE and LOAD target of every query."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    heard = []

    def listen():
        while True:
            try:
                connection, _address = listener.accept()
            except OSError:
                return
            with connection:
                connection.settimeout(2)
                try:
                    heard.append(connection.recv(2000))
                except OSError as error:
                    heard.append(repr(error).encode())

    threading.Thread(target=listen, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{listener.getsockname()[1]}/sparql", "heard": heard,
           "address": f"127.0.0.1:{listener.getsockname()[1]}"}
    listener.close()


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    with LocalFederation(site_names=(SITE, LIMITED, RESTART), patients_per_site=50, container_network="none",
                         writable_sparql=True, start_runners=False, lease_seconds=30,
                         site_settings={"max_concurrent_runs": 4, "long_poll_seconds": 2, "poll_interval_seconds": 0.2,
                                        "sparql_gateway": GENEROUS}) as federation:
        federation.configure_site(LIMITED, sparql_gateway=SMALL)
        for name in federation.site_names:
            federation.start_runner(name)
        yield federation


def update_url(federation, name):
    return federation.sites[name].sparql_endpoint.rsplit("/", 1)[0] + "/update"


def store_contents(federation, name):
    """Every quad in the site's real store, asked directly (not through any gateway)."""
    everything = "SELECT ?g ?s ?p ?o WHERE { { ?s ?p ?o } UNION { GRAPH ?g { ?s ?p ?o } } }"
    response = requests.post(federation.sites[name].sparql_endpoint, data={"query": everything}, timeout=30,
                             headers={"Accept": JSON_RESULTS})
    response.raise_for_status()
    return {tuple(json.dumps(row.get(name), sort_keys=True) for name in "gspo")
            for row in response.json()["results"]["bindings"]}


@pytest.fixture(scope="module")
def store_before(federation):
    """SITE's store before any task, after proving that it does accept updates when asked directly."""
    before = store_contents(federation, SITE)

    def update_directly(update):
        response = requests.post(update_url(federation, SITE), data=update.encode(), timeout=30,
                                 headers={"Content-Type": "application/sparql-update"})
        assert response.ok, f"{SITE}'s store refuses updates ({response.status_code}): writable_sparql did not take"

    update_directly(INSERT)
    assert len(store_contents(federation, SITE)) == len(before) + 1
    update_directly(INSERT.replace("INSERT DATA", "DELETE DATA"))
    assert store_contents(federation, SITE) == before
    return before


@pytest.fixture(scope="module")
def probe():
    return pushed_test_image("sparql-probe")


def postgres_port():
    url = os.environ.get("PHT_TEST_DATABASE_URL") or "postgresql://pht@127.0.0.1:5433/pht"
    return urllib.parse.urlsplit(url).port or 5432


def outside_addresses(federation, name, canary):
    """Every loopback service on the host that an algorithm must not reach (it may reach only the gateway)."""
    sparql_port = urllib.parse.urlsplit(federation.sites[name].sparql_endpoint).port
    return [f"127.0.0.1:{federation.registry_port}", IMAGE_REGISTRY, f"127.0.0.1:{postgres_port()}",
            f"127.0.0.1:{sparql_port}", canary["address"], f"[::1]:{federation.registry_port}",
            f"[::1]:{sparql_port}"]


REFUSAL_GROUPS = ("updates", "loose-updates", "services", "escaped-services", "methods", "paths")


@pytest.fixture(scope="module")
def steps(canary):
    """Each task's steps, and the groups the refusals task is made of."""
    steps = {
        "queries": queries_steps(canary["url"]),
        "updates": update_steps(canary["url"]),
        "loose-updates": loosely_refused_steps(),
        "services": service_steps(canary["url"]),
        "escaped-services": unicode_escape_steps(canary["url"]),
        "methods": method_steps(),
        "paths": other_path_steps(),
        "hostile": hostile_steps(),
        "parallel": parallel_steps(canary["url"]),
        "limits-count": limits_count_steps(),
        "limits-size": limits_size_steps(),
        "limits-time": limits_time_steps(),
    }
    steps["refusals"] = [step for group in REFUSAL_GROUPS for step in steps[group]]
    return steps


@pytest.fixture(scope="module")
def tasks(federation, canary, probe, steps, store_before):
    """Every task, submitted at once: name -> task."""
    researcher = federation.researcher()
    network = [{"name": "net", "do": "net"},
               {"name": "tcp", "do": "tcp", "addresses": outside_addresses(federation, SITE, canary)},
               {"name": "gateway", "do": "tcp", "addresses": ["127.0.0.1:8890"]}]
    inputs = {
        "restart": (RESTART, [loop_step(outside_addresses(federation, RESTART, canary))], 150),
        "queries": (SITE, steps["queries"], 60),
        "refusals": (SITE, steps["refusals"], 120),
        "network": (SITE, network, 60),
        "hostile": (SITE, steps["hostile"], 120),
        "parallel": (SITE, steps["parallel"], 60),
        "limits-count": (LIMITED, steps["limits-count"], 60),
        "limits-size": (LIMITED, steps["limits-size"], 60),
        "limits-time": (LIMITED, steps["limits-time"], 60),
    }
    return {name: researcher.submit(probe, {"steps": task_steps}, sites=[site], timeout_seconds=timeout)
            for name, (site, task_steps, timeout) in inputs.items()}


@pytest.fixture(scope="module")
def runs(federation, tasks):
    """name -> the task's one run, once every task but the restart one has ended."""
    return {name: wait_for_runs(federation, task, timeout_seconds=150)[0]
            for name, task in tasks.items() if name != "restart"}


def report_of(federation, runs, name):
    run = runs[name]
    assert run["status"] == "completed", (name, run["reason"])
    return output_json(federation, run, "report.json")


def query_log_path(federation, site, run):
    return federation.folder / site / "work" / "sparql-queries" / f"{run['id']}.jsonl"


def query_log(federation, site, run, complete=True):
    """The run's recorded queries; with complete=False a line still being written is left out."""
    path = query_log_path(federation, site, run)
    if not complete and not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if complete:
                raise
    return records


def moment(text):
    at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert at.utcoffset() is not None and at.utcoffset().total_seconds() == 0, f"{text} is not in UTC"
    return at


def sha256(text):
    return hashlib.sha256(text.encode()).hexdigest()


def count_in(result):
    return int(result["json"]["results"]["bindings"][0]["n"]["value"])


def assert_refused(name, result, statuses):
    """Refused by the gateway itself: the documented status, and a reason phrase and body that say so."""
    statuses = (statuses,) if isinstance(statuses, int) else statuses
    assert result.get("status") in statuses, (name, result)
    assert (result.get("reason") or "").startswith(REFUSED), (name, result.get("reason"))
    assert (result.get("body") or "").startswith(REFUSED), (name, result.get("body"))
    assert len(result["body"].strip()) > len(REFUSED) + 3, (name, "the refusal does not say why", result["body"])


def session_temp(federation, site, task):
    return federation.folder / site / "work" / "sessions" / str(task["session_id"]) / "temp"


def attempts_of(federation, site, task):
    path = session_temp(federation, site, task) / "attempts.jsonl"
    attempts = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            attempts.append(json.loads(line))
        except ValueError:
            pass  # still being written
    return attempts


def start_runner(federation, name):
    starts = federation.log_of(f"{name}-runner").count("runner started")
    federation.start_runner(name)
    wait_until(lambda: federation.log_of(f"{name}-runner").count("runner started") > starts, "the runner starts")


# --- 6. a runner killed mid-run (first, so the other sites' tasks run meanwhile) ---------------

def test_runner_killed_mid_run_serves_the_gateway_again_and_nothing_else_is_ever_reached(federation, tasks):
    task = tasks["restart"]
    wait_until(lambda: run_of(federation, task)["status"] == "running", "the looping probe runs", timeout=90)
    run = run_of(federation, task)
    wait_until(lambda: sum(r["status"] == "answered" for r in query_log(federation, RESTART, run, False)) >= 3,
               "the gateway answers the probe's queries", timeout=60)

    killed_at = datetime.now(timezone.utc)
    federation.stop_runner(RESTART, signal.SIGKILL)
    wait_until(lambda: any(not attempt["answered"] and moment(attempt["at"]) > killed_at
                           for attempt in attempts_of(federation, RESTART, task)),
               "the probe's queries fail while no runner runs", timeout=30)
    failures_meanwhile = [attempt["outcome"] for attempt in attempts_of(federation, RESTART, task)
                          if moment(attempt["at"]) > killed_at]

    restarted_at = datetime.now(timezone.utc)
    start_runner(federation, RESTART)

    def served_again():
        return any(record["status"] == "answered" and moment(record["at"]) > restarted_at
                   for record in query_log(federation, RESTART, run, False))

    wait_until(lambda: served_again() or run_of(federation, task)["status"] not in ("claimed", "running"),
               "the restarted runner serves the gateway again, or ends the run", timeout=60)
    (session_temp(federation, RESTART, task) / "stop").write_text("enough")
    run = only_run(federation, task, timeout_seconds=60)
    attempts = attempts_of(federation, RESTART, task)

    if served_again():
        assert run["status"] == "completed", run["reason"]
        loop = output_json(federation, run, "report.json")["steps"]["loop"]
        assert loop["stopped_by_file"], loop
        assert any(attempt["answered"] and moment(attempt["at"]) > restarted_at for attempt in attempts)
        for attempt in attempts:
            if attempt["answered"]:
                assert count_in({"json": attempt["answer"]}) == len(federation.sites[RESTART].patients)
        records = query_log(federation, RESTART, run)
        assert run["sparql"]["queries"] == len(records), run["sparql"]
    else:
        assert run["status"] == "failed", run
        assert re.search(r"gateway|sparql", run["reason"] or "", re.IGNORECASE), (
            f"the run failed without saying it was the gateway: {run['reason']!r}")

    # Before, during and after the outage: the probe reached nothing but the gateway.
    assert attempts and failures_meanwhile
    reached = [(attempt["at"], address) for attempt in attempts
               for address, what in attempt["reach"].items() if not what.startswith("failed")]
    assert not reached, reached
    assert "Traceback" not in federation.log_of(f"{RESTART}-runner")


# --- 1. what an honest algorithm asks ---------------------------------------------------------

def test_queries_are_answered_by_every_protocol_form(federation, runs):
    report = report_of(federation, runs, "queries")
    assert report["environment"] == {"SPARQL_ENDPOINT": GATEWAY, "endpointUrl": GATEWAY}
    steps = report["steps"]
    patients = federation.sites[SITE].patients

    for name in ("sparqlwrapper-count", "get-count", "form-count", "direct-count"):
        assert steps[name]["error"] is None, (name, steps[name])
        assert count_in(steps[name]) == len(patients), (name, steps[name])
    for name in ("get-count", "form-count", "direct-count"):
        assert steps[name]["status"] == 200
        assert steps[name]["content_type"].startswith(JSON_RESULTS), steps[name]
    assert steps["ask-true"]["json"]["boolean"] is True, steps["ask-true"]
    assert steps["ask-false"]["json"]["boolean"] is False, steps["ask-false"]
    assert steps["construct"]["status"] == 200 and steps["construct"]["error"] is None, steps["construct"]
    assert steps["construct"]["content_type"].startswith(N_TRIPLES), steps["construct"]
    assert steps["construct"]["lines"] == len(patients)
    assert steps["describe"]["status"] == 200 and steps["describe"]["lines"] == 6, steps["describe"]
    assert [int(row["age"]["value"]) for row in steps["select-seven"]["json"]["results"]["bindings"]] == [
        patient["age"] for patient in sorted(patients, key=lambda p: f"http://example.org/pht/{SITE}/patient/{p['id']}")
    ][:7]


# --- 2. updates and SERVICE, refused by the gateway (the store would have taken them) ----------

def test_every_update_is_refused_and_the_store_is_unchanged(federation, runs, steps, store_before):
    results = report_of(federation, runs, "refusals")["steps"]
    for step in steps["updates"]:
        assert_refused(step["name"], results[step["name"]], 403)
    for step in steps["loose-updates"]:
        assert_refused(step["name"], results[step["name"]], (400, 403))
    # Every task at this site has ended (the hostile one smuggled updates too): the store is as it was.
    assert store_contents(federation, SITE) == store_before


def test_every_service_clause_is_refused_and_never_called(federation, runs, steps, canary):
    results = report_of(federation, runs, "refusals")["steps"]
    for step in steps["services"]:
        assert_refused(step["name"], results[step["name"]], 403)
    for step in steps["escaped-services"]:
        result = results[step["name"]]
        assert result.get("status") in (400, 403), (step["name"], result)
    assert canary["heard"] == [], "the SERVICE or LOAD target was called"


def test_methods_other_than_get_and_post_are_refused(federation, runs, steps):
    results = report_of(federation, runs, "refusals")["steps"]
    for step in steps["methods"]:
        assert_refused(step["name"], results[step["name"]], 405)


def test_the_stores_own_write_paths_cannot_be_reached_through_the_gateway(federation, runs, steps, store_before):
    results = report_of(federation, runs, "refusals")["steps"]
    for step in steps["paths"]:
        result = results[step["name"]]
        assert result.get("status") is not None and 400 <= result["status"] < 500, (step["name"], result)
    assert store_contents(federation, SITE) == store_before


def test_queries_asked_at_once_are_each_answered_or_refused(federation, runs, store_before, canary):
    run = runs["parallel"]
    results = report_of(federation, runs, "parallel")["steps"]
    patients = len(federation.sites[SITE].patients)
    for result in results["counts"]:
        assert result["status"] == 200 and count_in(result) == patients, result
    for result in results["services"] + results["updates"]:
        assert_refused("parallel", result, 403)
    records = query_log(federation, SITE, run)
    assert sorted((r["status"], r["http_status"]) for r in records) == [("answered", 200)] * 16 + [("refused", 403)] * 32
    assert run["sparql"] == {"queries": 48, "refused": 32, "bytes": sum(r["bytes"] for r in records)}
    assert store_contents(federation, SITE) == store_before
    assert canary["heard"] == []


# --- 3. nothing but the gateway ---------------------------------------------------------------

def test_nothing_but_the_gateway_is_reachable(federation, runs, canary):
    steps = report_of(federation, runs, "network")["steps"]
    net = steps["net"]
    assert net["interfaces"] == ["lo"], net
    assert not [line for line in net["route"][1:] if line.split()[1:2] == ["00000000"]], net["route"]
    if isinstance(net["ipv6_route_devices"], list):  # (a string: IPv6 is off altogether)
        assert set(net["ipv6_route_devices"]) <= {"lo"}, net
    # The relay's one port is the only door in the algorithm's network namespace.
    assert "127.0.0.1:8890" in net["listening"], net["listening"]
    assert set(net["listening"]) <= {"127.0.0.1:8890", "[::1]:8890"}, net["listening"]
    assert steps["gateway"] == {"127.0.0.1:8890": "connected"}
    assert set(steps["tcp"]) == set(outside_addresses(federation, SITE, canary))
    for address, result in steps["tcp"].items():
        assert result.startswith("failed"), (address, result)
    assert canary["heard"] == []


# --- 4. the site's record of every query -----------------------------------------------------

def test_every_query_is_recorded_at_the_site(federation, runs, tasks, steps):
    run, task = runs["queries"], tasks["queries"]
    results = report_of(federation, runs, "queries")["steps"]
    records = query_log(federation, SITE, run)
    assert len(records) == len(QUERIES_EXPECTED) == len(steps["queries"]), records

    for record, step, (status, http_status, form) in zip(records, steps["queries"], QUERIES_EXPECTED):
        name = step["name"]
        assert LOG_FIELDS <= set(record), (name, record)
        assert (record["status"], record["http_status"]) == (status, http_status), (name, record)
        if form is not ...:
            assert record["form"] == form, (name, record)
        assert (record["run"], record["task"]) == (run["id"], task["id"]), (name, record)
        moment(record["at"])
        if "update" not in step.get("form", {}):  # (an update= field is no query: what is kept of it is open)
            assert record["query"] == sent_text(step), (name, record)
            assert record["query_sha256"] == sha256(sent_text(step)), (name, record)
        assert isinstance(record["bytes"], int) and record["bytes"] >= 0, (name, record)
        assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0, (name, record)
        if status == "answered":
            assert record["reason"] is None, (name, record)
            assert record["bytes"] > 0, (name, record)
            if results[name].get("bytes") is not None:  # urllib saw the exact answer
                assert record["bytes"] == results[name]["bytes"], (name, record, results[name]["bytes"])
        else:
            assert isinstance(record["reason"], str) and record["reason"], (name, record)
    rows = {step["name"]: record["rows"] for record, step in zip(records, steps["queries"])}
    assert [rows[name] for name in ("sparqlwrapper-count", "get-count", "form-count", "direct-count")] == [1] * 4
    assert rows["select-seven"] == 7
    ats = [moment(record["at"]) for record in records]
    assert ats == sorted(ats)


def test_the_operator_lists_a_runs_queries(federation, runs):
    run = runs["queries"]
    records = query_log(federation, SITE, run)
    command = [PYTHON, str(ROOT / "client" / "runScript.py"), "queries", str(run["id"]),
               "--config", str(federation.sites[SITE].config_path)]

    as_json = subprocess.run(command + ["--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    assert [json.loads(line) for line in as_json.stdout.splitlines() if line.strip()] == records

    plain = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    lines = [line for line in plain.stdout.splitlines() if line.strip()]
    assert len(lines) == len(records), plain.stdout
    assert sum("refused" in line for line in lines) == 3, plain.stdout


def test_the_run_record_and_log_carry_the_summary(federation, runs):
    run = runs["queries"]
    records = query_log(federation, SITE, run)
    queries, refused = len(records), sum(record["status"] == "refused" for record in records)
    read = sum(record["bytes"] for record in records)
    assert run["sparql"] == {"queries": queries, "bytes": read, "refused": refused} == {
        "queries": 12, "bytes": read, "refused": 3}
    log_lines = [line for line in run_log(federation, run).splitlines() if line.strip()]
    assert log_lines[-1] == f"[site runner] SPARQL gateway: {queries} queries, {refused} refused, {read} bytes read", (
        log_lines[-5:])


def test_query_text_is_not_kept_where_the_site_says_so(federation, runs, steps):
    run = runs["limits-count"]
    records = query_log(federation, LIMITED, run)
    # The query after the 429 found the gateway closed: it left no record.
    assert len(records) == SMALL["max_queries"] + 1
    for record, step in zip(records, steps["limits-count"]):
        assert record["query"] is None, record
        assert record["query_sha256"] == sha256(sent_text(step)), record
    folder = query_log_path(federation, LIMITED, run).parent
    for path in folder.iterdir():
        assert "pht-secret-marker" not in path.read_text(), path
        assert "ASK { ?s ?p ?o }" not in path.read_text(), path


# --- 5. limits ------------------------------------------------------------------------------

def test_more_queries_than_allowed_are_refused(federation, runs, steps):
    run = runs["limits-count"]
    results = report_of(federation, runs, "limits-count")["steps"]
    names = [step["name"] for step in steps["limits-count"]]
    for name in names[:SMALL["max_queries"]]:
        assert results[name]["status"] == 200 and results[name]["json"]["boolean"] is True, (name, results[name])
    over_the_limit, *after_it = names[SMALL["max_queries"]:]
    assert_refused(over_the_limit, results[over_the_limit], 429)
    # Then the gateway is closed for the run: no answer at all, so the record stays max_queries + 1 lines.
    for name in after_it:
        assert results[name]["status"] is None and results[name]["error"], (name, results[name])
    records = query_log(federation, LIMITED, run)
    assert [(r["status"], r["http_status"]) for r in records] == [("answered", 200)] * 5 + [("refused", 429)]
    assert run["sparql"] == {"queries": 6, "refused": 1, "bytes": sum(r["bytes"] for r in records)}


def test_an_answer_over_the_limit_is_cut_and_the_client_sees_an_error(federation, runs):
    run = runs["limits-size"]
    results = report_of(federation, runs, "limits-size")["steps"]
    assert results["small"]["status"] == 200 and results["small"]["json"]["boolean"] is True, results["small"]
    for name in ("construct-everything", "select-everything"):
        assert results[name]["error"], (name, "a cut answer looked like a complete one", results[name])
        assert results[name].get("bytes", 0) <= SMALL["max_response_bytes"], results[name]
        assert "json" not in results[name], results[name]
    records = query_log(federation, LIMITED, run)
    assert [r["status"] for r in records[:3]] == ["answered", "cut", "cut"], records
    assert [r["form"] for r in records[:3]] == ["ASK", "CONSTRUCT", "SELECT"], records
    for record in records[1:3]:
        assert record["bytes"] <= SMALL["max_response_bytes"], record


def test_a_query_over_the_size_limit_is_refused(federation, runs):
    run = runs["limits-size"]
    results = report_of(federation, runs, "limits-size")["steps"]
    for name in ("long-query-get", "long-query-direct"):
        assert_refused(name, results[name], 413)
    records = query_log(federation, LIMITED, run)
    assert [(r["status"], r["http_status"]) for r in records[3:]] == [("refused", 413)] * 2, records
    assert run["sparql"] == {"queries": 5, "refused": 2, "bytes": sum(r["bytes"] for r in records)}


def test_a_query_over_the_time_limit_fails(federation, runs):
    run = runs["limits-time"]
    results = report_of(federation, runs, "limits-time")["steps"]
    slow = results["slow"]
    # Oxigraph needs seconds for this join; the gateway gives up after 2 s.
    assert slow["status"] == 504 or slow["error"], slow
    assert "json" not in slow, slow
    assert slow["seconds"] < SMALL["query_timeout_seconds"] + 8, slow
    assert results["after-slow"]["status"] == 200, results["after-slow"]
    records = query_log(federation, LIMITED, run)
    assert records[0]["status"] in ("failed", "cut"), records[0]
    if records[0]["status"] == "failed":
        assert records[0]["http_status"] == 504, records[0]
    assert records[1]["status"] == "answered", records[1]


# --- 7. requests no client would send ---------------------------------------------------------

def test_hostile_requests_leave_the_gateway_answering_or_fail_the_run_cleanly(federation, runs):
    run = runs["hostile"]
    patients = len(federation.sites[SITE].patients)
    if run["status"] == "completed":
        steps = output_json(federation, run, "report.json")["steps"]
        for name in ("before", "after-big-header", "after-slowloris", "after-everything"):
            assert steps[name]["status"] == 200 and count_in(steps[name]) == patients, (name, steps[name])
        # A request hidden behind another one is not answered as if it were allowed (the store is checked too).
        for name in ("smuggle-cl-te", "pipelined-update", "pipelined-sparql-update"):
            answered = [line for line in steps[name]["reply_status_lines"] if line.split()[1].startswith("2")]
            assert len(answered) <= 1, (name, steps[name]["reply_status_lines"])
    else:
        assert run["status"] == "failed", run
        assert run["reason"] and "Traceback" not in run["reason"], run["reason"]
    assert "Traceback" not in federation.log_of(f"{SITE}-runner")


# --- the runner's own configuration ------------------------------------------------------------

def test_host_network_is_refused_without_allow_host_network(federation, tmp_path):
    config = json.loads(federation.sites[SITE].config_path.read_text())
    config.update(registry_url=f"http://127.0.0.1:{free_port()}", work_dir=str(tmp_path / "work"))
    config["container"]["network"] = "host"
    config.pop("allow_host_network", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        done = subprocess.run([PYTHON, str(ROOT / "client" / "runScript.py"), "--config", str(tmp_path / "config.json"),
                               "--once"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a runner configured with container.network host started instead of refusing")
    assert done.returncode != 0, done.stderr
    assert "allow_host_network" in done.stderr, done.stderr


def test_no_runner_broke(federation, runs, canary):
    for name in (SITE, LIMITED, RESTART):
        assert "Traceback" not in federation.log_of(f"{name}-runner"), name
    assert canary["heard"] == []
