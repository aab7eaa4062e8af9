"""The researcher's side of the registry: post tasks, wait for them, read their results.

    registry = Registry("http://127.0.0.1:5000", token)
    task = registry.submit("registry.example.org/group/algorithm:1", {"label": "round 1"})
    for result in registry.wait_for_results(task["id"]):
        print(result.site, result.exit_code, result.read_json("result.json"))
"""

import base64
import io
import json
import tarfile
import time
from dataclasses import dataclass

import requests

TERMINAL_STATES = ("completed", "failed", "refused", "cancelled")


class RegistryError(Exception):
    """The registry rejected a request; the message says why."""


class TaskTimeout(Exception):
    pass


@dataclass
class RunResult:
    """One site's answer to a task."""
    run_id: int
    site: str
    status: str
    reason: str | None
    exit_code: int | None
    image_digest: str | None
    log: str
    files: dict  # path inside /output -> bytes

    def read_json(self, name):
        return json.loads(self.files[name])


class Registry:
    def __init__(self, url, token):
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def submit(self, image, task_input, sites=None, session_id=None, name=None, timeout_seconds=None):
        """Post a task; task_input is a dict (sent as JSON), str or bytes. Returns the task."""
        body = {"image": image, "sites": sites, "session_id": session_id, "name": name,
                "timeout_seconds": timeout_seconds}
        if isinstance(task_input, bytes):
            body["input_base64"] = base64.b64encode(task_input).decode()
        else:
            body["input"] = task_input if isinstance(task_input, str) else json.dumps(task_input)
        return self._call("POST", "/api/tasks", json={k: v for k, v in body.items() if v is not None})

    def task(self, task_id):
        return self._call("GET", f"/api/tasks/{task_id}")

    def cancel(self, task_id):
        return self._call("POST", f"/api/tasks/{task_id}/cancel")

    def wait(self, task_id, timeout_seconds=600, poll_seconds=0.5):
        """The task once every run has ended; TaskTimeout if that takes longer than timeout_seconds."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            task = self.task(task_id)
            if all(run["status"] in TERMINAL_STATES for run in task["runs"]):
                return task
            if time.monotonic() > deadline:
                states = ", ".join(f"{r['site']}: {r['status']}" for r in task["runs"])
                raise TaskTimeout(f"task {task_id} not finished after {timeout_seconds} s ({states})")
            time.sleep(poll_seconds)

    def wait_for_results(self, task_id, timeout_seconds=600):
        """Every site's RunResult, once all have ended."""
        return [self.result(run) for run in self.wait(task_id, timeout_seconds)["runs"]]

    def result(self, run):
        files = {}
        if run["output_sha256"]:
            archive = self._download(f"/api/runs/{run['id']}/output")
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        files[member.name] = tar.extractfile(member).read()
        log = self._download(f"/api/runs/{run['id']}/log").decode("utf-8", "replace") if run["log_sha256"] else ""
        return RunResult(run["id"], run["site"], run["status"], run["reason"], run["exit_code"],
                         run["image_digest"], log, files)

    def _download(self, path):
        response = self.http.get(self.url + path, timeout=300)
        _raise_for(response)
        return response.content

    def _call(self, method, path, **kwargs):
        response = self.http.request(method, self.url + path, timeout=60, **kwargs)
        _raise_for(response)
        return response.json()


def _raise_for(response):
    if response.ok:
        return
    try:
        body = response.json()
        message = body.get("message", "")
        if body.get("detail"):
            message += f": {json.dumps(body['detail'])}"
    except ValueError:
        message = response.text
    raise RegistryError(f"{response.status_code} {message}")
