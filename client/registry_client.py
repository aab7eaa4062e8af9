"""The runner's contact with the registry: outbound HTTP requests only.

Reports that must not be lost (start, uploads, the final status, a refusal) are
retried with backoff while the registry is unreachable or answers 5xx; the caller
keeps the run's files on disk until one of them has been confirmed. Deliveries to a
recipient's FileService (deliveries.py) are retried the same way.
"""

import hashlib
import logging
import time

import requests

log = logging.getLogger("pht.runner")

RUNNER_VERSION = "pht-runner/0.2"


class LeaseLost(Exception):
    """The registry no longer lets this runner report on the run (expired, cancelled or taken over)."""


class RegistryRefused(Exception):
    """The registry rejected a request for a reason retrying cannot fix."""


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
        """The next run for this site, waiting up to wait_seconds; None if none came."""
        response = self.http.post(
            f"{self.url}/api/site/claim",
            json={"wait_seconds": wait_seconds, "runner_version": RUNNER_VERSION, "sparql_ok": sparql_ok},
            timeout=wait_seconds + 30)
        if response.status_code == 204:
            return None
        _raise_for(response)
        return response.json()

    def download_input(self, run_id):
        """The task's configuration file, as bytes (the registry keeps these small)."""
        return self._reliably(lambda: self.http.get(f"{self.url}/api/site/runs/{run_id}/input", timeout=60),
                              f"download of the input of run {run_id}").content

    def heartbeat(self, run_id, lease_id):
        """One try: the run's status at the registry ('cancelled' means: stop it)."""
        response = self.http.post(f"{self.url}/api/site/runs/{run_id}/heartbeat",
                                  json={"lease_id": lease_id}, timeout=30)
        _raise_for(response)
        return response.json()["status"]

    def run_status(self, run_id, lease_id):
        """Like heartbeat, but retried while the registry is unreachable."""
        return self._post_reliably(f"/api/site/runs/{run_id}/heartbeat", {"lease_id": lease_id}).json()["status"]

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


def _raise_for(response):
    if response.ok:
        return
    try:
        message = response.json().get("message", response.text)
    except ValueError:
        message = response.text
    if response.status_code == 409:
        raise LeaseLost(message)
    raise RegistryRefused(f"{response.request.method} {response.url}: {response.status_code} {message}")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
