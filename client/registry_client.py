"""The runner's contact with the registry: outbound HTTP requests only.

Reports that must not be lost (start, uploads, the final status, a refusal) are
retried with backoff while the registry is unreachable or answers 5xx; the caller
keeps the run's files on disk until one of them has been confirmed. Deliveries to a
recipient's FileService (deliveries.py) are retried the same way.

The registry may be compromised, so its answers are read with care: every answer is
complete within a deadline for the whole exchange (an answer trickled byte by byte
cannot hold the runner), at most MAX_ANSWER_BYTES once decompressed (a small gzip
cannot become gigabytes), never through a redirect, and whatever goes wrong on the way
is a registry problem to log and retry, never a crash.

A problem that lasts is logged as it begins, when it changes and every few minutes (Outage), each time
in one line that names it (connection_problem): not once per retry, and never as the chain of
urllib3's exceptions.
"""

import base64
import hashlib
import http.client
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import requests
import urllib3

from client.claim import InvalidClaim, parse_claim
from common.printable import printable

log = logging.getLogger("pht.runner")

RUNNER_VERSION = "pht-runner/0.3"
MAX_MESSAGE_CHARS = 500
MAX_ANSWER_BYTES = 1024 ** 2  # a claim, an identity, a status or an error message: small JSON
CONNECT_SECONDS = 10
STOP_GRACE_SECONDS = 2
OUTAGE_REMINDER_SECONDS = 600  # how often a problem that goes on is logged again
# How soon another change of problem may be logged after the last one was: a registry whose error text changes at
# every answer, or a link that alternates between two failures, must not write a line per attempt.
OUTAGE_CHANGE_SECONDS = 60


class LeaseLost(Exception):
    """The registry no longer lets this runner report on the run (expired, cancelled or taken over)."""


class RegistryRefused(Exception):
    """The registry rejected a request for a reason retrying cannot fix."""


class TokenRefused(RegistryRefused):
    """The registry does not accept this site's token (401/403): it is wrong, another's, or revoked."""


class InputTooLarge(Exception):
    """The task's input is over this site's limit."""

    def __init__(self, max_bytes):
        super().__init__(f"the task's input is over this site's limit of {max_bytes} bytes "
                         "(max_input_bytes in its config)")


class Unreachable(Exception):
    """The registry, or a recipient's FileService, did not answer for as long as the runner would retry."""


class GarbledAnswer(requests.RequestException):
    """The answer could not be read: too large, cut short, badly encoded, or not complete in time."""


# What a registry that is down, restarting, overloaded or misbehaving looks like from here: anything
# that goes wrong on the way (connections, timeouts, redirects, broken encodings, garbled answers).
TRANSIENT_ERRORS = (requests.RequestException,)
MAX_SESSIONS_ASKED = 1000  # the registry's limit per request; the others are asked about next time


class RegistryClient:
    def __init__(self, url, token, retry_for_seconds=600, connections=10, ca_bundle=None):
        """ca_bundle: a PEM file of the CAs that sign the registry's certificate (default: the system's)."""
        self.url = url.rstrip("/")
        self.retry_for_seconds = retry_for_seconds
        self.http = requests.Session()
        self.http.verify = str(ca_bundle) if ca_bundle else True
        # The main loop, and every run's worker and heartbeat, talk to the registry at the same time.
        self.http.mount(self.url, requests.adapters.HTTPAdapter(pool_maxsize=connections))
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.headers["User-Agent"] = RUNNER_VERSION
        self.http.max_redirects = 0  # the registry answers for itself: a redirect is an error, never followed
        self.http.trust_env = False  # no proxy or .netrc from the environment changes where requests go
        # Whether the registry can start a claimed run (API 1.6): learned from its claims' answers, since an older
        # one refuses a claim that asks.
        self.starts_claimed_runs = False

    def claim_run(self, wait_seconds, sparql_ok, stopping=None, start_pinned=False):
        """The next run for this site as a checked Claim, waiting up to wait_seconds; None if none came.
        Raises InvalidClaim for an answer the runner must not act on. Once stopping (an Event) is set, the
        claim is given up within STOP_GRACE_SECONDS: a run it may have leased returns when its lease runs out.
        start_pinned: ask the registry to start a run whose image is pinned by digest (if it can)."""
        asked = {"start_pinned": True} if start_pinned and self.starts_claimed_runs else {}
        try:
            response = self._answer("POST", "/api/site/claim", wait_seconds + 30, stopping=stopping, json={
                "wait_seconds": wait_seconds, "runner_version": RUNNER_VERSION, "sparql_ok": sparql_ok, **asked})
        except GarbledAnswer as error:
            raise InvalidClaim([f"the registry's answer to a claim could not be read: {error}"]) from None
        if response.status_code == 204:
            return None
        if asked and 400 <= response.status_code < 500:
            # A registry before API 1.6 (rolled back, or a replica not upgraded yet) refuses the field: the next
            # claim asks without it.
            self.starts_claimed_runs = False
        _raise_for(response)
        answer = _json_or_none(response)
        if answer is None:
            raise InvalidClaim(["the registry's answer to a claim is not a JSON object"])
        claim = parse_claim(answer)
        self.starts_claimed_runs = claim.started is not None
        return claim

    def site_name(self):
        """One try: the name the registry knows this token by; None from a registry too old to say."""
        response = self._answer("GET", "/api/site/me", 30)
        if response.status_code == 404:
            return None
        _raise_for(response)
        answer = _json_or_none(response)
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise RegistryRefused(f"GET {response.url}: the answer is not a site's identity")
        return answer["name"]

    def closed_sessions(self, session_ids):
        """One try: which of these sessions the registry says are closed (or unknown to it); None from a registry
        too old to say. Only ids that were asked about come back, whatever the registry sends."""
        asked = sorted(session_ids)[:MAX_SESSIONS_ASKED]
        response = self._answer("POST", "/api/site/sessions/closed", 30, json={"session_ids": asked})
        if response.status_code in (404, 405):
            return None
        _raise_for(response)
        answer = _json_or_none(response)
        closed = answer.get("closed") if isinstance(answer, dict) else None
        if not isinstance(closed, list):
            raise RegistryRefused(f"POST {response.url}: the answer is not a list of closed sessions")
        return set(asked) & {entry for entry in closed if type(entry) is int}

    def download_input(self, run_id, destination, max_bytes):
        """Stream the task's configuration file to destination, never whole in memory; raises InputTooLarge
        past max_bytes, and Unreachable if the registry went away meanwhile (the next try starts over)."""
        what = f"download of the input of run {run_id}"
        response = self._reliably(
            lambda: self.http.get(f"{self.url}/api/site/runs/{run_id}/input", timeout=60, stream=True), what)
        destination = Path(destination)
        destination.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        try:
            with response, open(destination, "wb") as file:
                for chunk in response.iter_content(1024 * 1024):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InputTooLarge(max_bytes)
                    file.write(chunk)
        except requests.RequestException as error:
            raise Unreachable(f"{what}: interrupted ({type(error).__name__})") from None

    def heartbeat(self, run_id, lease_id):
        """One try: the run's status at the registry ('cancelled' means: stop it)."""
        response = self._answer("POST", f"/api/site/runs/{run_id}/heartbeat", 30, json={"lease_id": lease_id})
        _raise_for(response)
        return _status_in(response)

    def run_status(self, run_id, lease_id):
        """Like heartbeat, but retried while the registry is unreachable."""
        return _status_in(self._post_reliably(f"/api/site/runs/{run_id}/heartbeat", {"lease_id": lease_id}))

    def report_started(self, run_id, lease_id, image_digest):
        self._post_reliably(f"/api/site/runs/{run_id}/start", {"lease_id": lease_id, "image_digest": image_digest})

    def park(self, run_id, lease_id, status, reason, image_digest=None):
        """Tell the registry the run waits for a person at this site (lifecycle.PARKED_STATES), and why."""
        body = {"lease_id": lease_id, "status": status, "reason": reason}
        if image_digest is not None:
            body["image_digest"] = image_digest
        self._post_reliably(f"/api/site/runs/{run_id}/park", body)

    def resume(self, run_id, lease_id):
        """Go on with a parked run: its lease runs again from now."""
        return _status_in(self._post_reliably(f"/api/site/runs/{run_id}/resume", {"lease_id": lease_id}))

    def refuse(self, run_id, lease_id, reason):
        self._post_reliably(f"/api/site/runs/{run_id}/refuse", {"lease_id": lease_id, "reason": reason})

    def upload(self, run_id, lease_id, kind, path):
        """Returns the sha256 of what was sent, which the registry checked."""
        sha256 = sha256_of(path)

        def send():
            with open(path, "rb") as body:
                return self._answer("PUT", f"/api/site/runs/{run_id}/{kind}", 3600, data=body, headers={
                    "X-Lease-Id": lease_id, "X-Content-SHA256": sha256, "Content-Type": "application/octet-stream"})
        self._reliably(send, f"upload of the {kind} of run {run_id}")
        return sha256

    def finish(self, run_id, lease_id, exit_code, failure_reason=None, sparql=None, carried=None):
        """How the run ended; sparql: what its gateway saw ({"queries", "bytes", "refused"}), if it had one;
        carried: the output and log to send within the report ({"output" or "log": path}), each no larger than
        the claim's inline_result_bytes."""
        body = {"lease_id": lease_id, "exit_code": exit_code, "failure_reason": failure_reason}
        if sparql is not None:
            body["sparql"] = sparql
        what = f"report of how run {run_id} ended"
        if carried:
            what += f", with its {' and '.join(carried)}"
        for kind, path in (carried or {}).items():
            body[f"{kind}_base64"] = base64.b64encode(Path(path).read_bytes()).decode()
        self._post_reliably(f"/api/site/runs/{run_id}/finish", body, what)

    def record_delivery(self, run_id, lease_id, recipient, name, size, sha256):
        """A receipt for a file sent straight to a recipient: the registry learns that it went, not what it was."""
        self._post_reliably(f"/api/site/runs/{run_id}/deliveries", {
            "lease_id": lease_id, "recipient": recipient, "name": name, "size": size, "sha256": sha256})

    def _post_reliably(self, path, body, what=None):
        return self._reliably(lambda: self._answer("POST", path, 60, json=body), what or f"POST {path}")

    def _answer(self, method, path, seconds, stopping=None, **request):
        """The registry's whole answer to one request, within seconds for the whole exchange, its body at most
        MAX_ANSWER_BYTES decompressed. Raises a requests.RequestException for anything that went wrong."""
        outcome = {}

        def exchange():
            try:
                with self.http.request(method, f"{self.url}{path}", stream=True, timeout=seconds,
                                       **request) as response:
                    body = response.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
                if len(body) > MAX_ANSWER_BYTES:
                    raise GarbledAnswer(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
                response._content = body  # so that .json() and .text read what was read here
                outcome["response"] = response
            # requests' own errors first: they are OSErrors too, and their kind (an unverified certificate,
            # a refused connection) is what the runner reports.
            except requests.RequestException as error:
                outcome["error"] = error
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
                outcome["error"] = GarbledAnswer(f"the answer could not be read: {connection_problem(error)}")
        # A thread of its own, so that the deadline holds even against an answer that trickles.
        thread = threading.Thread(target=exchange, name="registry-request", daemon=True)
        thread.start()
        deadline = time.monotonic() + seconds + CONNECT_SECONDS
        while thread.is_alive() and time.monotonic() < deadline:
            if stopping is not None and stopping.is_set():
                deadline = min(deadline, time.monotonic() + STOP_GRACE_SECONDS)
                stopping = None
            thread.join(min(0.5, max(deadline - time.monotonic(), 0)))
        if thread.is_alive():
            raise GarbledAnswer(f"{method} {path}: no complete answer in time")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["response"]

    def _reliably(self, send, what):
        response = send_reliably(send, what, self.retry_for_seconds, url=self.url)
        _raise_for(response)
        return response


def send_reliably(send, what, retry_for_seconds, peer="registry", url=None):
    """send() until the peer (at url, if given) answers other than 5xx (that answer is returned), backing off
    meanwhile. Its problem is logged when it begins or changes (and every few minutes), not at every retry."""
    delay = 1.0
    deadline = time.monotonic() + retry_for_seconds
    outage = Outage()
    at = f" at {url}" if url else ""
    while True:
        try:
            response = send()
            if response.status_code < 500:
                return response
            problem = f"{peer}{at} answered {response.status_code}"
        except TRANSIENT_ERRORS as error:
            problem = request_problem(error, peer, url)
        if time.monotonic() + delay > deadline:
            raise Unreachable(f"{what}: gave up after {retry_for_seconds} s: {problem}")
        said = outage.failed(problem, time.monotonic())
        if said:
            log.warning("%s: %s; retrying for up to %d s", what, said, retry_for_seconds)
        time.sleep(delay)
        delay = min(delay * 2, 30)


class Outage:
    """A problem that may last (the registry away, say), to be logged when it begins, when it changes (a change at
    most every change_seconds) and every remind_seconds while it goes on, not at every attempt; and its end, once.
    No clock inside: the caller gives the time, so a test needs no waiting."""

    def __init__(self, remind_seconds=OUTAGE_REMINDER_SECONDS, change_seconds=OUTAGE_CHANGE_SECONDS):
        self.remind_seconds = remind_seconds
        self.change_seconds = change_seconds
        self.problem = None  # as last said
        self.began_at = None  # when the outage began, whatever its problem since
        self.said_at = None
        self.changed_at = None  # when a change of problem was last said

    def failed(self, problem, now):
        """The words to log for this failure (problem, and how long it has gone on when it is said again), or
        None when they were said less than remind_seconds ago."""
        if self.began_at is None:
            self.began_at = now
        again = problem == self.problem
        if again and now - self.said_at < self.remind_seconds:
            return None
        if not again and self.problem is not None:
            if self.changed_at is not None and now - self.changed_at < self.change_seconds:
                return None
            self.changed_at = now
        self.problem, self.said_at = problem, now
        return f"{problem} (for {round((now - self.began_at) / 60)} min now)" if again else problem

    def answered(self):
        """Whether this answer ends an outage (for the caller to say so); the next failure begins a new one."""
        ended = self.began_at is not None
        self.problem = self.began_at = self.said_at = self.changed_at = None
        return ended


def request_problem(error, peer="registry", url=None):
    """A request to peer (at url) that raised error (a requests exception), in one line for the log (pure)."""
    at = f" at {url}" if url else ""
    if isinstance(error, GarbledAnswer):
        return f"{peer}{at}: {error}"  # it answered, but not in a way the runner reads
    return f"{peer} unreachable{at}: {connection_problem(error)}"


def connection_problem(error):
    """What kept a peer from answering a request, in a few words for the log (pure): named from the exceptions
    chained to error, never by their text (urllib3's "HTTPConnectionPool(host=...): Max retries exceeded with
    url: ... (Caused by NewConnectionError(...))")."""
    if isinstance(error, GarbledAnswer):
        return str(error)  # this module's own words: named from what it was made of
    causes = _causes(error)
    for kinds, words in _NAMED_PROBLEMS:
        if any(isinstance(cause, kinds) for cause in causes):
            return words
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
    return type(error).__name__


# From the most telling: a connection broken by a timeout is a timeout. RemoteDisconnected is a ConnectionResetError
# too, so it comes before it.
_NAMED_PROBLEMS = (
    (ConnectionRefusedError, "connection refused"),
    (socket.gaierror, "its host name is not known"),
    (ssl.SSLCertVerificationError, "its TLS certificate is not verified"),
    (ssl.SSLError, "the TLS handshake failed"),
    ((requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError), "no answer in time"),
    (http.client.RemoteDisconnected, "the connection closed without an answer"),
    (ConnectionResetError, "connection reset"),
    (http.client.IncompleteRead, "the answer was cut short"),
    (http.client.HTTPException, "its answer is not HTTP"),
    (requests.TooManyRedirects, "it answers with a redirect, which is not followed"),
    (urllib3.exceptions.ProtocolError, "the connection broke off"),
)


def _causes(error, most=20):
    """The error and the exceptions chained to it: as causes, contexts, reasons (urllib3) or arguments (requests)."""
    waiting, seen = [error], []
    while waiting and len(seen) < most:
        cause = waiting.pop(0)
        if any(cause is known for known in seen):
            continue
        seen.append(cause)
        waiting += [link for link in (getattr(cause, "reason", None), cause.__cause__, cause.__context__, *cause.args)
                    if isinstance(link, BaseException)]
    return seen


def _json_or_none(response):
    """The answer's JSON, or None if it is not JSON: what the registry sends is checked, never trusted."""
    try:
        return response.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python parses
        return None


def _status_in(response):
    """A run's status from the registry's answer; a malformed answer is the registry's fault, not a crash."""
    answer = _json_or_none(response)
    status = answer.get("status") if isinstance(answer, dict) else None
    if not isinstance(status, str) or not status.isidentifier():
        raise RegistryRefused(f"{response.request.method} {response.url}: the answer is not a run's status")
    return status


def _raise_for(response):
    if response.ok:
        return
    answer = _json_or_none(response)
    message = answer.get("message") if isinstance(answer, dict) else None
    # The registry's words go into the site's log: one line, printable, not too long.
    message = printable(str(message if message is not None else response.text))[:MAX_MESSAGE_CHARS]
    if response.status_code == 409:
        raise LeaseLost(message)
    if response.status_code in (401, 403):
        raise TokenRefused(f"{response.status_code} {message}")
    raise RegistryRefused(f"{response.request.method} {response.url}: {response.status_code} {message}")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
