"""The runner's only contact with the outside world: outbound HTTP requests to the registry.

Reports that must not be lost (uploads, the final status) are retried with
backoff while the registry is unreachable or answers 5xx; the run's files stay
on disk until the registry has confirmed them.
"""

import hashlib
import logging
import time

import requests

log = logging.getLogger("pht.runner")

RUNNER_VERSION = "pht-runner/0.1"


class LeaseLost(Exception):
    """The registry no longer lets this runner report on the run (expired, cancelled or taken over)."""


class RegistryRefused(Exception):
    """The registry rejected a request for a reason retrying cannot fix."""


class RegistryClient:
    def __init__(self, url, token, retry_for_seconds=600):
        self.url = url.rstrip("/")
        self.retry_for_seconds = retry_for_seconds
        self.http = requests.Session()
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

    def download_input(self, run_id, destination):
        with self.http.get(f"{self.url}/api/site/runs/{run_id}/input", stream=True, timeout=60) as response:
            _raise_for(response)
            with open(destination, "wb") as file:
                for chunk in response.iter_content(1024 * 1024):
                    file.write(chunk)

    def report_started(self, run_id, lease_id, image_digest):
        self._post_reliably(f"/api/site/runs/{run_id}/start", {"lease_id": lease_id, "image_digest": image_digest})

    def heartbeat(self, run_id, lease_id):
        """The run's status at the registry ('cancelled' means: stop it)."""
        response = self.http.post(f"{self.url}/api/site/runs/{run_id}/heartbeat",
                                  json={"lease_id": lease_id}, timeout=30)
        _raise_for(response)
        return response.json()["status"]

    def refuse(self, run_id, lease_id, reason):
        self._post_reliably(f"/api/site/runs/{run_id}/refuse", {"lease_id": lease_id, "reason": reason})

    def upload(self, run_id, lease_id, kind, path):
        sha256 = _sha256_of(path)

        def send():
            with open(path, "rb") as body:
                return self.http.put(
                    f"{self.url}/api/site/runs/{run_id}/{kind}", data=body, timeout=300,
                    headers={"X-Lease-Id": lease_id, "X-Content-SHA256": sha256,
                             "Content-Type": "application/octet-stream"})
        self._reliably(send, f"upload of {kind} for run {run_id}")

    def finish(self, run_id, lease_id, exit_code, failure_reason=None):
        self._post_reliably(f"/api/site/runs/{run_id}/finish",
                            {"lease_id": lease_id, "exit_code": exit_code, "failure_reason": failure_reason})

    def _post_reliably(self, path, body):
        self._reliably(lambda: self.http.post(f"{self.url}{path}", json=body, timeout=60), f"POST {path}")

    def _reliably(self, send, what):
        delay = 1.0
        deadline = time.monotonic() + self.retry_for_seconds
        while True:
            try:
                response = send()
                if response.status_code < 500:
                    _raise_for(response)
                    return response
                problem = f"registry answered {response.status_code}"
            except requests.ConnectionError as error:
                problem = f"registry unreachable ({type(error).__name__})"
            if time.monotonic() + delay > deadline:
                raise RegistryRefused(f"{what}: gave up after {self.retry_for_seconds} s: {problem}")
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


def _sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
