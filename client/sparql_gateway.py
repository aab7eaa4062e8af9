"""The per-run SPARQL gateway: the only way an algorithm reaches the site's data.

    algorithm ──TCP 127.0.0.1:8890──> relay container ──Unix socket──> RunGateway (here, in the runner)
    (network namespace shared with the relay, no route out)                   │ checks, records
                                                                              └──HTTP──> the site's endpoint

The runner serves one RunGateway per run on a Unix socket in the run's folder
(work_dir/runs/<id>/gateway/sparql.sock); the relay (sparql_relay/) connects the
container's loopback to it. Each request is judged by sparql_queries.py; an allowed
query is forwarded to the endpoint and its answer streamed back chunk by chunk,
so a large result costs the runner no more than a chunk of memory. Limits: the size
of a query, the time and bytes of an answer, the number of queries in a run (after
which the gateway closes for that run). Every query is recorded, one JSON line each, in
work_dir/sparql-queries/<run id>.jsonl, which stays after the run's folder is removed.

A runner killed mid-run takes the gateway with it: the relay then finds nothing to
connect to and the algorithm's queries fail. The next runner opens the gateway again
at the same path, and its queries are answered again.
"""

import json
import logging
import os
import re
import socket
import socketserver
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import requests
import urllib3

from common.printable import shown
from client.registry_client import connection_problem
from client.sparql_queries import QueryRequest, query_sha256, read_request, refused, unpack_request
from client.sparql_results import row_counter

log = logging.getLogger("pht.runner")

SOCKET_NAME = "sparql.sock"
PORT_IN_CONTAINER = 8890
ENDPOINT_IN_CONTAINER = f"http://127.0.0.1:{PORT_IN_CONTAINER}/sparql"
CHUNK_BYTES = 64 * 1024
IDLE_SECONDS = 30  # a connection that sends nothing for this long is closed
CONNECTIONS_PER_RUN = 8  # more wait in the socket's backlog; an algorithm cannot make the runner spawn threads
CONNECT_SECONDS = 10
MAX_ACCEPT_HEADER = 1000
CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
# The query log keeps the start of each query's text (its sha256 names all of it), and no text at all
# once a run's log has grown this large: a run cannot fill the site's disk through it.
MAX_RECORDED_QUERY_CHARS = 2000
MAX_LOG_BYTES_WITH_TEXT = 20 * 1024 ** 2
MAX_DISCARDED_BYTES = 16 * 1024 ** 2  # of a body over the limit, read before the 413 so the client sees it
IN_FLIGHT_GRACE_SECONDS = 10  # how long closing waits for answers under way, so the run's summary counts them


class Upstream:
    """The site's real SPARQL endpoint, as the gateway asks it."""

    def __init__(self, url, connections=4):
        self.url = url
        self.http = requests.Session()
        # Never through a proxy from the environment: the endpoint is the site's own.
        self.http.trust_env = False
        self.http.mount(url, requests.adapters.HTTPAdapter(pool_maxsize=connections))

    def open(self, query, accept, timeout_seconds):
        """The endpoint's streamed response to one checked query."""
        headers = {"Accept": accept} if accept else {}
        # No redirects: the gateway talks to the endpoint the site configured, and to nothing it points at.
        return self.http.post(self.url, data=[("query", query.text), *query.dataset], headers=headers,
                              stream=True, timeout=(CONNECT_SECONDS, timeout_seconds), allow_redirects=False)


def endpoint_problem(upstream, timeout_seconds=5):
    """None if the endpoint answers an ASK sent the way the gateway sends queries, else what went wrong."""
    ask = QueryRequest("ASK { ?s ?p ?o }", "ASK", ())
    try:
        with upstream.open(ask, "application/sparql-results+json", timeout_seconds) as response:
            if not response.ok:
                return f"it answered {response.status_code} {response.reason}"
            answer = json.loads(response.raw.read(CHUNK_BYTES, decode_content=True))
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
        return connection_problem(error)  # a few words, not urllib3's chain of reprs
    except ValueError:
        return "the answer to an ASK query was not a SPARQL JSON result"
    if not isinstance(answer, dict) or "boolean" not in answer:
        return "the answer to an ASK query was not a SPARQL result"
    return None


# What the start-up self-test runs in a container on the relay's image: an ASK, as an algorithm would send it.
SELF_TEST_SCRIPT = f"""
import json, urllib.request
request = urllib.request.Request("{ENDPOINT_IN_CONTAINER}", data=b"query=ASK%20%7B%20%3Fs%20%3Fp%20%3Fo%20%7D",
    headers={{"Accept": "application/sparql-results+json", "Content-Type": "application/x-www-form-urlencoded"}})
answer = json.load(urllib.request.urlopen(request, timeout=30))
assert isinstance(answer, dict) and "boolean" in answer, "not a SPARQL result: " + repr(answer)[:200]
"""


# --- the record of a run's queries ---------------------------------------------------------

def query_log_path(work_dir, run_id):
    return Path(work_dir) / "sparql-queries" / f"{int(run_id)}.jsonl"


def read_query_log(path):
    """The recorded queries one by one, oldest first, never all in memory; a line cut short by a crash is
    left out."""
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry
    except FileNotFoundError:
        return


def summarize(entries):
    """What the researcher learns of a run's queries: how many, bytes read, how many refused."""
    summary = {"queries": 0, "bytes": 0, "refused": 0}
    for entry in entries:
        summary["queries"] += 1
        summary["bytes"] += entry.get("bytes", 0) if isinstance(entry.get("bytes"), int) else 0
        summary["refused"] += entry.get("status") == "refused"
    return summary


class QueryLog:
    """Appends one JSON line per query; safe from the gateway's several connection threads."""

    def __init__(self, path, run_id, task_id, record_query_text):
        self.path = Path(path)
        self.run_id, self.task_id = run_id, task_id
        self.record_query_text = record_query_text
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.parent.chmod(0o700)  # queries may quote patients' data
        self._lock = threading.Lock()
        self.entries_before = summarize(read_query_log(self.path))["queries"]  # from before a restart
        self._bytes = self.path.stat().st_size if self.path.exists() else 0

    def record(self, *, form, text, sha256, status, http_status, reason, rows, sent, started):
        keep_text = self.record_query_text and text is not None and self._bytes < MAX_LOG_BYTES_WITH_TEXT
        entry = {
            "at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "run": self.run_id, "task": self.task_id, "form": form,
            "query": text[:MAX_RECORDED_QUERY_CHARS] if keep_text else None, "query_sha256": sha256,
            "query_chars": len(text) if text is not None else None,
            "status": status, "http_status": http_status, "reason": reason, "rows": rows, "bytes": sent,
            "duration_ms": round((time.monotonic() - started) * 1000, 2),
        }
        # ensure_ascii: whatever an algorithm sends, each entry is one line of plain ASCII.
        line = json.dumps(entry, ensure_ascii=True) + "\n"
        with self._lock, open(self.path, "a", encoding="ascii") as log_file:
            log_file.write(line)
            self._bytes += len(line)


# --- one run's gateway ---------------------------------------------------------------------

class RunGateway:
    def __init__(self, run_id, task_id, socket_dir, upstream, limits, query_log, socket_owner=None, parse=None):
        """limits: the site's sparql_gateway settings (site_config.SparqlGatewaySettings); socket_owner: the
        uid of the relay, the one user (besides root) that may connect, when the runner runs as root; parse:
        what reads a new query (a ParserPool's judge, with a time limit; by default rdflib in this process)."""
        self.parse = parse
        self._one_parse_at_a_time = threading.Lock()  # a run with slow queries holds one parser, not all
        self.socket_owner = socket_owner if os.geteuid() == 0 else None
        self.run_id, self.task_id = run_id, task_id
        self.socket_dir = Path(socket_dir)
        self.upstream, self.limits, self.query_log = upstream, limits, query_log
        self._lock = threading.Lock()
        self.requests = query_log.entries_before  # after a restart, the requests made before count
        self._in_flight = 0
        self._exhausted = False
        self._nothing_in_flight = threading.Condition(self._lock)
        self._server = None
        self._thread = None

    def open(self):
        """Listen on the run's socket (again, after a restart); the relay finds it at the same path."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_owner is None:
            self.socket_dir.chmod(0o755)  # the relay's user must reach the socket; so can other local users
        else:
            os.chown(self.socket_dir, self.socket_owner, self.socket_owner)
            self.socket_dir.chmod(0o700)
        if self.requests >= self.limits.max_queries:
            log.info("run %s: it used up its %d SPARQL queries; the gateway stays closed", self.run_id,
                     self.limits.max_queries)
            return
        # Through the folder's descriptor: a Unix socket's path may be at most 107 bytes, a work_dir's longer.
        folder = os.open(self.socket_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            try:
                os.unlink(SOCKET_NAME, dir_fd=folder)
            except FileNotFoundError:
                pass
            self._server = _Server(f"/proc/self/fd/{folder}/{SOCKET_NAME}", self)
            # The relay runs as an unprivileged user, which must be able to connect.
            if self.socket_owner is None:
                os.chmod(SOCKET_NAME, 0o666, dir_fd=folder)
            else:
                os.chown(SOCKET_NAME, self.socket_owner, self.socket_owner, dir_fd=folder)
                os.chmod(SOCKET_NAME, 0o600, dir_fd=folder)
        finally:
            os.close(folder)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"gateway-{self.run_id}",
                                        daemon=True)
        self._thread.start()

    def close(self):
        """Stop answering: no new connections; those under way end with their answers."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.closing = True
        # shutdown() waits until the serving loop sees its flag, which it looks at when its poll returns: shutting
        # the listening socket down (no connection is accepted after it) makes the poll return at once, so a run's
        # report does not wait for a poll interval.
        stopping = threading.Thread(target=server.shutdown, name=f"gateway-{self.run_id}-stop")
        stopping.start()
        server.socket.shutdown(socket.SHUT_RDWR)
        stopping.join()
        server.server_close()
        try:
            (self.socket_dir / SOCKET_NAME).unlink()
        except FileNotFoundError:
            pass
        with self._nothing_in_flight:
            self._nothing_in_flight.wait_for(lambda: self._in_flight == 0, timeout=IN_FLIGHT_GRACE_SECONDS)

    def answer(self, handler):
        """One HTTP request from the algorithm: judge it, forward it or refuse it, and record it. Whatever
        goes wrong, the request is answered (if nothing was sent yet) and recorded: never a traceback."""
        started = time.monotonic()
        with self._lock:
            if self._exhausted or self._server is None:
                # Closed (its run has ended), or the run's one over-the-limit request was refused and recorded and
                # the gateway is closing: a request on a connection kept alive from before is dropped, unanswered and
                # unrecorded, as a closed gateway would. (A relay kept for the session's next run cannot go on
                # asking as this run.)
                handler.close_connection = True
                return
            self._in_flight += 1
            self.requests += 1
            over_the_limit = self._exhausted = self.requests > self.limits.max_queries
        try:
            self._answer(handler, started, over_the_limit)
        except Exception as error:  # a broken request or connection; the algorithm's doing, not a runner bug
            reason = f"the request could not be handled: {shown(error, 200)}"
            log.info("run %s: SPARQL gateway: %s", self.run_id, reason)
            handler.close_connection = True
            if not getattr(handler, "answer_started", False):
                self._send_plain(handler, 400, refused(400, "the request could not be read").reason)
            self.query_log.record(form=None, text=None, sha256=None, status="failed", http_status=400,
                                  reason=reason, rows=None, sent=0, started=started)
        finally:
            with self._nothing_in_flight:
                self._in_flight -= 1
                self._nothing_in_flight.notify_all()

    def _answer(self, handler, started, over_the_limit):
        limits = self.limits
        body, refusal = b"", None
        if handler.command == "POST":
            length = handler.headers.get("Content-Length", "")
            if not CONTENT_LENGTH.fullmatch(length):
                refusal = refused(411, "send the POST body with a Content-Length")
            elif int(length) > limits.max_query_bytes:
                refusal = refused(413, f"the query is longer than this site's limit of {limits.max_query_bytes} bytes")
                # Read (and drop) what the client sends anyway, so that it is ready to read the refusal.
                _discard(handler.rfile, min(int(length), MAX_DISCARDED_BYTES))
            else:
                body = handler.rfile.read(int(length))
        _path, _, query_string = handler.path.partition("?")
        if over_the_limit:
            # Refused, recorded, and the gateway closes: the record of a run stays at most max_queries + 1 lines.
            # Nothing is parsed.
            text = unpack_request(handler.command, query_string, handler.headers.get("Content-Type"), body)[0]
            self._refuse(handler, refused(429, f"this run reached this site's limit of {limits.max_queries} "
                                               "queries; the gateway is closed for it"), text, body, started)
            threading.Thread(target=self.close, name=f"gateway-{self.run_id}-close", daemon=True).start()
            return
        if refusal:
            return self._refuse(handler, refusal, None, body, started)
        with self._one_parse_at_a_time:
            query, refusal, text = read_request(handler.command, query_string, handler.headers.get("Content-Type"),
                                                body, limits.max_query_bytes, self.parse)
        if refusal:
            return self._refuse(handler, refusal, text, body, started)
        self._forward(handler, query, started)

    def _forward(self, handler, query, started):
        limits = self.limits
        record = dict(form=query.form, text=query.text, sha256=query_sha256(query.text), started=started)
        accept = (handler.headers.get("Accept") or "")[:MAX_ACCEPT_HEADER]
        # The time limit counts from here, after the query was read and judged.
        deadline = time.monotonic() + limits.query_timeout_seconds
        try:
            response = self.upstream.open(query, accept, limits.query_timeout_seconds)
        except requests.Timeout:
            return self._fail(handler, 504, f"the site's SPARQL endpoint did not answer within "
                                            f"{limits.query_timeout_seconds} s", record)
        except requests.RequestException as error:
            return self._fail(handler, 502, f"the site's SPARQL endpoint did not answer ({type(error).__name__})",
                              record)
        status = "answered" if response.ok else "failed"
        reason = None if response.ok else f"the site's SPARQL endpoint answered {response.status_code}"
        counter = row_counter(response.headers.get("Content-Type")) if response.ok and query.form != "ASK" else None
        sent, ended = 0, False
        # A watchdog ends the answer at the deadline even when the endpoint trickles: reads wait only for the next
        # bytes, so checking the time between chunks alone would let a slow answer run on.
        overdue = threading.Event()
        watchdog = threading.Timer(max(deadline - time.monotonic(), 0), lambda: (overdue.set(), response.close()))
        watchdog.daemon = True
        watchdog.start()
        with response:
            handler.answer_started = True
            handler.send_response(response.status_code)
            handler.send_header("Content-Type", response.headers.get("Content-Type", "application/octet-stream"))
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while True:
                try:
                    # Whole pieces of CHUNK_BYTES, not the endpoint's own HTTP chunks (Oxigraph's are ~1 KB):
                    # every piece costs a write here, a pump in the relay and a chunk for the client to parse.
                    chunk = response.raw.read(CHUNK_BYTES, decode_content=True)
                except (urllib3.exceptions.HTTPError, OSError) as error:
                    status, reason = "cut", f"reading the endpoint's answer failed ({type(error).__name__})"
                    break
                if not chunk:
                    ended = True
                    break
                if sent + len(chunk) > limits.max_response_bytes:
                    status, reason = "cut", f"the answer is longer than this site's limit of " \
                                            f"{limits.max_response_bytes} bytes"
                    break
                if overdue.is_set():
                    break
                try:
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                except OSError:
                    status, reason = "failed", "the algorithm closed the connection before the answer's end"
                    break
                sent += len(chunk)
                if counter:
                    counter.feed(chunk)
        watchdog.cancel()
        if overdue.is_set():
            status, reason, ended = "cut", f"the answer took longer than {limits.query_timeout_seconds} s", False
        if ended:
            self._end_chunks(handler)
        else:
            # No closing chunk: the algorithm's HTTP client sees the answer end early, never a short success.
            handler.close_connection = True
        self.query_log.record(status=status, http_status=response.status_code, reason=reason,
                              rows=counter.rows() if counter and status == "answered" else None, sent=sent, **record)

    def _refuse(self, handler, refusal, text, body, started):
        log.info("run %s: SPARQL gateway %s", self.run_id, refusal.reason)
        self._send_plain(handler, refusal.status, refusal.reason)
        self.query_log.record(form=None, text=text, sha256=query_sha256(text if text is not None else body),
                              status="refused", http_status=refusal.status, reason=refusal.reason, rows=None,
                              sent=0, started=started)

    def _fail(self, handler, status, reason, record):
        self._send_plain(handler, status, reason)
        self.query_log.record(status="failed", http_status=status, reason=reason, rows=None, sent=0, **record)

    @staticmethod
    def _send_plain(handler, status, reason):
        """The reason as the status line's phrase too: urllib and SPARQLWrapper show only that."""
        body = (reason + "\n").encode("utf-8")
        # A refused request's connection is not reused: its body may not have been read.
        handler.close_connection = True
        handler.answer_started = True
        try:
            handler.send_response(status, reason)
            handler.send_header("Connection", "close")
            handler.send_header("Content-Type", "text/plain; charset=utf-8")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            handler.close_connection = True

    @staticmethod
    def _end_chunks(handler):
        try:
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True


def _discard(stream, size):
    while size > 0:
        chunk = stream.read(min(size, CHUNK_BYTES))
        if not chunk:
            return
        size -= len(chunk)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 16

    def __init__(self, path, gateway):
        self.gateway = gateway
        self.closing = False
        self.slots = threading.BoundedSemaphore(CONNECTIONS_PER_RUN)
        super().__init__(path, _Handler)

    def process_request(self, request, client_address):
        while not self.slots.acquire(timeout=0.5):
            if self.closing:
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            # The algorithm's end went away before its answer (a broken pipe, a reset): its doing, not a runner bug,
            # and one it can repeat at will, so no traceback in the site's log for it.
            log.debug("run %s: SPARQL gateway: a connection ended early: %s", self.gateway.run_id, error)
            return
        log.exception("run %s: SPARQL gateway: a request failed", self.gateway.run_id)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pht-sparql-gateway"
    sys_version = ""
    timeout = IDLE_SECONDS

    def __getattr__(self, name):
        # Every method reaches the gateway, which refuses all but GET and POST with its own reason.
        if name.startswith("do_"):
            return lambda: self.server.gateway.answer(self)
        raise AttributeError(name)

    def address_string(self):
        return "algorithm"

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("run %s: SPARQL gateway: " + format, self.server.gateway.run_id, *args)
