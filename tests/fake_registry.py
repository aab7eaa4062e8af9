"""A registry that says whatever a test scripts: a real HTTP server on 127.0.0.1, for driving a real site runner.

The site runner must treat the registry as possibly compromised (client/claim.py), so its tests need a
registry that lies: claims with hostile fields, answers that are not JSON, bodies that never end, a token
taken back half-way. FakeRegistry serves the site API (docs/api.md) from scripted answers and records every
request it receives, so a test waits on what the runner did (a refusal, a finish, its next poll) instead
of sleeping.

    registry = FakeRegistry("hospital-a")          # answers /api/site/me as hospital-a
    registry.offer_claim({"id": 5, ...})           # the next claim; a long-poll waiting now gets it at once
    registry.script("heartbeat", Answer.text("no json"), run_id=5)
    registry.wait_for(lambda: registry.requests("finish", run_id=5), "run 5 is finished")
    registry.stop()

Each endpoint has a default answer (the well-behaved registry's), which registry.defaults changes for
good, and a queue of scripted answers that are used first, once each: per run, then for the endpoint.
registry.reset() forgets all of that and what was recorded, for a registry (and its runner) kept from
test to test.
An Answer is a status with a body, a body sent piece by piece (without end, if the test says so), or raw
bytes written to the socket in place of a whole HTTP response.
"""

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

# The site API's run endpoints (docs/api.md); anything else is "unknown" and answers 404.
RUN_ENDPOINTS = ("input", "start", "heartbeat", "refuse", "output", "log", "finish", "deliveries", "park", "resume")
_RUN_PATH = re.compile(r"/api/site/runs/([^/]+)/([^/]+)")
MAX_LONG_POLL_SECONDS = 10  # the fake never holds a claim request longer, whatever the runner asks


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    headers: tuple = (("Content-Type", "application/json"),)
    pieces: Callable | None = None  # yields the body's pieces; sent chunked unless headers give a length
    raw: bytes | None = None  # written to the socket as the whole response, then the connection is closed

    @classmethod
    def json(cls, value, status=200):
        return cls(status, json.dumps(value).encode())

    @classmethod
    def text(cls, text, status=200, content_type="text/plain"):
        body = text if isinstance(text, bytes) else text.encode()
        return cls(status, body, (("Content-Type", content_type),))

    @classmethod
    def no_content(cls):
        return cls(204, b"", ())

    @classmethod
    def endless(cls, piece=b"x" * 65536, content_length=None, hang_up_after=16 * 1024 ** 2):
        """A body that does not end: piece after piece until the runner hangs up. With content_length, it is
        announced with that length instead of sent chunked. After hang_up_after bytes the fake hangs up mid-body
        (far past any limit under test), so a runner that ignores its limit cannot fill the test machine's disk."""
        def pieces():
            for _ in range(hang_up_after // len(piece) + 1):
                yield piece
            raise ConnectionAbortedError("the fake registry hangs up")
        headers = (("Content-Type", "application/octet-stream"),)
        if content_length is not None:
            headers += (("Content-Length", str(content_length)),)
        return cls(200, b"", headers, pieces=pieces)

    @classmethod
    def trickle(cls, piece=b" ", every_seconds=0.2):
        """A body that never ends and never pauses long: a piece every every_seconds (a slow-loris answer)."""
        def pieces():
            while True:
                yield piece
                time.sleep(every_seconds)
        return cls(200, b"", (("Content-Type", "application/json"),), pieces=pieces)

    @classmethod
    def raw_bytes(cls, raw):
        return cls(raw=raw)


@dataclass
class Request:
    """One request as the fake received it."""
    method: str
    path: str
    kind: str  # me, claim, one of RUN_ENDPOINTS, or unknown
    run_id: str | None  # as written in the path
    headers: dict
    body: bytes
    at: float = field(default_factory=time.monotonic)
    served: str | None = None  # for claims: the label of the claim answer it got (None: 204 or a default)
    answered: bool = False  # its answer is chosen (a long-poll waiting for a claim is not yet)

    @property
    def json(self):
        try:
            return json.loads(self.body)
        except ValueError:
            return None


class FakeRegistry:
    def __init__(self, site_name):
        self.site_name = site_name
        self.defaults = self._well_behaved()
        self._scripted = {}  # (kind, run id or None) -> deque of Answers
        self._claims = deque()  # (label, Answer)
        self._requests = []
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.registry = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # Polled for shutdown every 50 ms, not 0.5 s: every test that stops a registry waits for it.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-registry", daemon=True)
        self._thread.start()

    def _well_behaved(self):
        return {
            "me": Answer.json({"id": 1, "name": self.site_name}),
            "input": Answer.text(b"{}", content_type="application/octet-stream"),
            "heartbeat": Answer.json({"status": "running"}),
            "park": Answer.no_content(),
            "resume": Answer.json({"status": "claimed", "lease_seconds": 30}),
            "unknown": Answer.json({"message": "no such endpoint in the fake registry"}, status=404),
        }

    def reset(self):
        """For a registry kept from test to test (with its runner): the defaults as at start, nothing scripted or
        offered, and only the requests still waiting for their answer (the runner's long-poll) kept on record."""
        with self._changed:
            self.defaults = self._well_behaved()
            self._scripted.clear()
            self._claims.clear()
            self._requests = [request for request in self._requests if not request.answered]

    def stop(self):
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- what a test scripts ----------------------------------------------------

    def offer_claim(self, claim, label=None):
        """Queue the answer to a later claim request: a JSON value, or an Answer. Returns its label."""
        answer = claim if isinstance(claim, Answer) else Answer.json(claim)
        with self._changed:
            label = label or f"claim-{len(self._claims)}-{time.monotonic_ns()}"
            self._claims.append((label, answer))
            self._changed.notify_all()
        return label

    def script(self, kind, *answers, run_id=None):
        """Queue answers for an endpoint (of one run, if run_id is given), each used once, before its default."""
        with self._changed:
            self._scripted.setdefault((kind, None if run_id is None else str(run_id)), deque()).extend(answers)

    # --- what the runner did ------------------------------------------------------

    def requests(self, kind=None, run_id=None):
        with self._changed:
            return [request for request in self._requests
                    if (kind is None or request.kind == kind) and (run_id is None or request.run_id == str(run_id))]

    def bodies(self, kind, run_id=None):
        """The JSON bodies of the requests to one endpoint (refuse reasons, finish reports...)."""
        return [request.json for request in self.requests(kind, run_id)]

    def claim_requests_after(self, label):
        """Claim requests that came after the one answered with the claim labelled so (the runner's next polls)."""
        with self._changed:
            claims = [request for request in self._requests if request.kind == "claim"]
            served = [index for index, request in enumerate(claims) if request.served == label]
            return claims[served[0] + 1:] if served else []

    def pending_claims(self):
        with self._changed:
            return len(self._claims)

    def wait_for(self, condition, what, timeout=30, also=None):
        """Wait until condition() is true, checking whenever a request arrives; also() may raise to give up early
        (a runner that exited). Raises AssertionError naming what was waited for."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if also:
                    also()
                result = condition()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not within {timeout} s: {what}")
                # Woken by every request; conditions on anything else (the runner's output, containers, its exit)
                # are checked again every 0.1 s.
                self._changed.wait(min(left, 0.1))

    # --- serving ----------------------------------------------------------------------

    def _record(self, request):
        with self._changed:
            self._requests.append(request)
            self._changed.notify_all()

    def _answer_for(self, request):
        if request.kind == "claim":
            return self._next_claim(request)
        with self._changed:
            request.answered = True
            for key in ((request.kind, request.run_id), (request.kind, None)):
                queue = self._scripted.get(key)
                if queue:
                    return queue.popleft()
            return self.defaults.get(request.kind, Answer.json({}))

    def _next_claim(self, request):
        try:
            wait_seconds = float((request.json or {}).get("wait_seconds", 0))
        except (AttributeError, TypeError, ValueError):
            wait_seconds = 0
        deadline = time.monotonic() + min(max(wait_seconds, 0), MAX_LONG_POLL_SECONDS)
        with self._changed:
            while not self._claims and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            request.answered = True
            if not self._claims or self._stopping.is_set():
                return self.defaults.get("claim", Answer.no_content())
            label, answer = self._claims.popleft()
            request.served = label
            self._changed.notify_all()
            return answer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-registry"

    def do_GET(self):
        registry = self.server.registry
        request = self._read_request()
        registry._record(request)
        answer = registry._answer_for(request)
        try:
            self._send(answer, registry._stopping)
        except ConnectionError:  # the runner hung up, as it may (or the fake did, on purpose)
            self.close_connection = True

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def log_message(self, format, *args):
        pass

    def _read_request(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?", 1)[0]
        kind, run_id = "unknown", None
        if path in ("/api/site/me", "/api/site/claim"):
            kind = path.rsplit("/", 1)[1]
        elif path == "/api/site/sessions/closed":
            kind = "closed-sessions"
        elif (match := _RUN_PATH.fullmatch(path)) and match[2] in RUN_ENDPOINTS:
            run_id, kind = match[1], match[2]
        return Request(method=self.command, path=path, kind=kind, run_id=run_id, headers=dict(self.headers.items()),
                       body=body)

    def _send(self, answer, stopping):
        if answer.raw is not None:
            self.wfile.write(answer.raw)
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_response(answer.status)
        for name, value in answer.headers:
            self.send_header(name, value)
        if answer.pieces is None:
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer.body)
            return
        chunked = not any(name.lower() == "content-length" for name, _ in answer.headers)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        for piece in answer.pieces():
            if stopping.is_set():
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
