"""The runner's contact with the registry: outbound HTTP requests only.

Reports that must not be lost (start, uploads, the final status, a refusal) are
retried with backoff while the registry is unreachable or answers 5xx; the caller
keeps the run's files on disk until one of them has been confirmed. Deliveries to a
recipient's FileService (deliveries.py) are retried the same way.
"""

import hashlib
import logging
import time
from pathlib import Path

import requests

from client.claim import InvalidClaim, parse_claim
from client.printable import printable

log = logging.getLogger("pht.runner")

RUNNER_VERSION = "pht-runner/0.3"
MAX_MESSAGE_CHARS = 500


class LeaseLost(Exception):
    """The registry no longer lets this runner report on the run (expired, cancelled or taken over)."""


class RegistryRefused(Exception):
    """The registry rejected a request for a reason retrying cannot fix."""


class TokenRefused(RegistryRefused):
    """The registry does not accept this site's token (401/403): it is wrong, another's, or revoked."""


class InputTooLarge(Exception):
    """The task's input is over this site's limit."""


class Unreachable(Exception):
    """The registry, or a recipient's FileService, did not answer for as long as the runner would retry."""


# What a registry that is down, restarting or overloaded looks like from here.
TRANSIENT_ERRORS = (requests.ConnectionError, requests.Timeout)


class RegistryClient:
    def __init__(self, url, token, retry_for_seconds=600, connections=10):
        self.url = url.rstrip("/")
        self.retry_for_seconds = retry_for_seconds
        self.http = requests.Session()
        # The main loop, and every run's worker and heartbeat, talk to the registry at the same time.
        self.http.mount(self.url, requests.adapters.HTTPAdapter(pool_maxsize=connections))
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.headers["User-Agent"] = RUNNER_VERSION

    def claim_run(self, wait_seconds, sparql_ok):
        """The next run for this site as a checked Claim, waiting up to wait_seconds; None if none came.
        Raises InvalidClaim for an answer the runner must not act on."""
        response = self.http.post(
            f"{self.url}/api/site/claim",
            json={"wait_seconds": wait_seconds, "runner_version": RUNNER_VERSION, "sparql_ok": sparql_ok},
            timeout=wait_seconds + 30)
        if response.status_code == 204:
            return None
        _raise_for(response)
        try:
            answer = response.json()
        except ValueError:
            raise InvalidClaim(["the registry's answer to a claim is not JSON"]) from None
        return parse_claim(answer)

    def site_name(self):
        """One try: the name the registry knows this token by; None from a registry too old to say."""
        response = self.http.get(f"{self.url}/api/site/me", timeout=30)
        if response.status_code == 404:
            return None
        _raise_for(response)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            raise RegistryRefused(f"GET {response.url}: the answer is not a site's identity")
        return answer["name"]

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
                        raise InputTooLarge(f"the task's input is over this site's limit of {max_bytes} bytes "
                                            "(max_input_bytes in its config)")
                    file.write(chunk)
        except requests.RequestException as error:
            raise Unreachable(f"{what}: interrupted ({type(error).__name__})") from None

    def heartbeat(self, run_id, lease_id):
        """One try: the run's status at the registry ('cancelled' means: stop it)."""
        response = self.http.post(f"{self.url}/api/site/runs/{run_id}/heartbeat",
                                  json={"lease_id": lease_id}, timeout=30)
        _raise_for(response)
        return _status_in(response)

    def run_status(self, run_id, lease_id):
        """Like heartbeat, but retried while the registry is unreachable."""
        return _status_in(self._post_reliably(f"/api/site/runs/{run_id}/heartbeat", {"lease_id": lease_id}))

    def report_started(self, run_id, lease_id, image_digest):
        self._post_reliably(f"/api/site/runs/{run_id}/start", {"lease_id": lease_id, "image_digest": image_digest})

    def refuse(self, run_id, lease_id, reason):
        self._post_reliably(f"/api/site/runs/{run_id}/refuse", {"lease_id": lease_id, "reason": reason})

    def upload(self, run_id, lease_id, kind, path):
        sha256 = sha256_of(path)

        def send():
            with open(path, "rb") as body:
                return self.http.put(
                    f"{self.url}/api/site/runs/{run_id}/{kind}", data=body, timeout=300,
                    headers={"X-Lease-Id": lease_id, "X-Content-SHA256": sha256,
                             "Content-Type": "application/octet-stream"})
        self._reliably(send, f"upload of the {kind} of run {run_id}")

    def finish(self, run_id, lease_id, exit_code, failure_reason=None, sparql=None):
        """How the run ended; sparql: what its gateway saw ({"queries", "bytes", "refused"}), if it had one."""
        body = {"lease_id": lease_id, "exit_code": exit_code, "failure_reason": failure_reason}
        if sparql is not None:
            body["sparql"] = sparql
        self._post_reliably(f"/api/site/runs/{run_id}/finish", body)

    def record_delivery(self, run_id, lease_id, recipient, name, size, sha256):
        """A receipt for a file sent straight to a recipient: the registry learns that it went, not what it was."""
        self._post_reliably(f"/api/site/runs/{run_id}/deliveries", {
            "lease_id": lease_id, "recipient": recipient, "name": name, "size": size, "sha256": sha256})

    def _post_reliably(self, path, body):
        return self._reliably(lambda: self.http.post(f"{self.url}{path}", json=body, timeout=60), f"POST {path}")

    def _reliably(self, send, what):
        response = send_reliably(send, what, self.retry_for_seconds)
        _raise_for(response)
        return response


def send_reliably(send, what, retry_for_seconds, peer="registry"):
    """send() until the peer answers other than 5xx (that answer is returned), backing off meanwhile."""
    delay = 1.0
    deadline = time.monotonic() + retry_for_seconds
    while True:
        try:
            response = send()
            if response.status_code < 500:
                return response
            problem = f"{peer} answered {response.status_code}"
        except TRANSIENT_ERRORS as error:
            problem = f"{peer} unreachable ({type(error).__name__})"
        if time.monotonic() + delay > deadline:
            raise Unreachable(f"{what}: gave up after {retry_for_seconds} s: {problem}")
        log.warning("%s: %s; retrying in %.0f s", what, problem, delay)
        time.sleep(delay)
        delay = min(delay * 2, 30)


def _status_in(response):
    """A run's status from the registry's answer; a malformed answer is the registry's fault, not a crash."""
    try:
        status = response.json()["status"]
    except (ValueError, KeyError, TypeError):
        status = None
    if not isinstance(status, str) or not status.isidentifier():
        raise RegistryRefused(f"{response.request.method} {response.url}: the answer is not a run's status")
    return status


def _raise_for(response):
    if response.ok:
        return
    try:
        answer = response.json()
    except ValueError:
        answer = None
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
