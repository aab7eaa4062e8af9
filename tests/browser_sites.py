"""Sites for the dashboard's tests and screenshots, simulated by speaking the registry's real site API over HTTP
with real site tokens: claim, start, upload output and log, finish or refuse. No Docker, no runner."""

import hashlib
import io
import tarfile

import requests

IMAGE = "127.0.0.1:5050/pht/summary:latest"


class SimulatedSite:
    def __init__(self, registry_url, headers, name):
        self.url, self.headers, self.name = registry_url, headers, name

    def _post(self, path, body):
        answer = requests.post(f"{self.url}/api/site{path}", json=body, headers=self.headers, timeout=30)
        assert answer.status_code in (200, 204), f"{self.name}: POST {path} answered {answer.status_code} {answer.text}"
        return answer

    def claim(self, sparql_ok=True, runner_version="sim-1.0"):
        """The site's next run (claimed), or None; the claim is also the site's sighting (online)."""
        answer = self._post("/claim", {"wait_seconds": 0, "runner_version": runner_version, "sparql_ok": sparql_ok})
        return answer.json() if answer.status_code == 200 else None

    def start(self, run):
        self._post(f"/runs/{run['id']}/start", {"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64})

    def upload(self, run, kind, body):
        answer = requests.put(f"{self.url}/api/site/runs/{run['id']}/{kind}", data=body, timeout=30, headers={
            **self.headers, "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(body).hexdigest(),
            "Content-Type": "application/octet-stream"})
        assert answer.status_code == 200, f"{self.name}: upload of the {kind} answered {answer.status_code}"

    def finish(self, run, exit_code=0, failure_reason=None, sparql=None):
        self._post(f"/runs/{run['id']}/finish", {"lease_id": run["lease_id"], "exit_code": exit_code,
                                                 "failure_reason": failure_reason, "sparql": sparql})

    def deliver(self, run, recipient, name, body):
        """The receipt for a file the site sent straight to a third party's FileService."""
        self._post(f"/runs/{run['id']}/deliveries", {"lease_id": run["lease_id"], "recipient": recipient,
                                                     "name": name, "size": len(body),
                                                     "sha256": hashlib.sha256(body).hexdigest()})

    def refuse(self, run, reason):
        self._post(f"/runs/{run['id']}/refuse", {"lease_id": run["lease_id"], "reason": reason})

    def run_to_the_end(self, output_files, log, exit_code=0, failure_reason=None, sparql=None):
        """Claim the site's next run, run it and report: the output folder (name -> bytes) and log uploaded."""
        run = self.claim()
        assert run is not None, f"{self.name} has no run to claim"
        self.start(run)
        self.upload(run, "output", output_archive(output_files))
        self.upload(run, "log", log)
        self.finish(run, exit_code, failure_reason, sparql)
        return run


def output_archive(files):
    """A run's /output/ folder as the runner uploads it: a gzipped tar archive."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, body in files.items():
            member = tarfile.TarInfo(f"output/{name}")
            member.size = len(body)
            archive.addfile(member, io.BytesIO(body))
    return buffer.getvalue()


def post_task(registry_url, researcher_headers, sites, **fields):
    answer = requests.post(f"{registry_url}/api/tasks", headers=researcher_headers, timeout=30, json={
        "image": IMAGE, "input": '{"variables": ["age"]}', "sites": sites, **fields})
    assert answer.status_code == 201, f"posting a task answered {answer.status_code}: {answer.text}"
    return answer.json()
