"""The researcher's side of the registry: post tasks, wait for them, read their results.

    registry = Registry("http://127.0.0.1:5000", token)
    task = registry.submit("registry.example.org/group/algorithm:1", {"label": "round 1"})
    for result in registry.wait_for_results(task["id"]):
        print(result.site, result.exit_code, result.output)

Tasks, runs and sites are the registry's JSON objects as plain dicts (see docs/api.md);
a site's answer is a RunResult, whose output archive and log are downloaded to files (see
researcher/results.py for how long they last and how they are read).
"""

import base64
import hashlib
import json
import logging
import math
import os
import time
from concurrent import futures
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from common.names import SHA256_HEX
from common.printable import escaped, shown
from common.transport import plain_http_warning
from master import lifecycle
from researcher import keys
from researcher.images import pin_to_digest
from researcher.progress import SiteProgress
from researcher.results import DownloadFolder, ResultLimits, ResultTooLarge, RunResult, describe_file

log = logging.getLogger("pht.researcher")

PAGE_SIZE = 200  # the registry's largest page

# A registry at its connection cap answers 503 with Retry-After, and may close a kept-alive connection
# just as a request goes out on it; behind a balancer, a replica that dies during a request (a wait for a
# task, say) leaves it a 502 or 504: reads are asked again, a few times. Posts are not (a task posted
# twice would run twice). Nothing else is retried: not a certificate that fails verification (an "other"
# error to urllib3).
READS_RETRIED = Retry(total=5, connect=5, read=0, other=0, status=5, status_forcelist=[502, 503, 504],
                      allowed_methods={"GET"},
                      backoff_factor=0.5, respect_retry_after_header=True, raise_on_status=False)
DOWNLOAD_CHUNK_BYTES = 256 * 1024
# A task's results are downloaded this many at a time (each its own connection to the registry).
PARALLEL_DOWNLOADS = 4

# Each wait is a long-poll that the registry answers the moment a run ends; its length only
# sets how often the progress display is refreshed while nothing ends.
PROGRESS_REFRESH_SECONDS = 2


class RegistryError(Exception):
    """The registry rejected a request, or could not be reached; the message says why."""


class ChecksumMismatch(RegistryError):
    """A file the registry sent is not the one it lists for the run (another sha256); nothing of it was kept."""


class TaskTimeout(Exception):
    """A task's runs did not all end in time; `task` is its last known state."""

    def __init__(self, task, timeout_seconds):
        self.task = task
        states = ", ".join(f"{run['site']}: {run['status']}" + (f" ({run['reason']})" if run["status"] in
                                                                  lifecycle.PARKED_STATES else "")
                           for run in task["runs"])
        super().__init__(escaped(f"task {task['id']} not finished after {timeout_seconds:g} s ({states})"))


class TaskFailed(Exception):
    """Some sites did not complete a task. `results` holds every site's RunResult, the
    completed ones included, and `failed` the others."""

    def __init__(self, task_id, results):
        self.results = results
        self.failed = [result for result in results if not result.ok]
        reasons = "; ".join(result.describe_failure() for result in self.failed)
        super().__init__(escaped(f"task {task_id}: {len(self.failed)} of {len(results)} sites did not complete "
                                      f"it: {reasons}"))


class Registry:
    def __init__(self, url, token, identity_file=None, limits=None, download_dir=None, ca_bundle=None):
        """identity_file: the private age key that opens the results of encrypted tasks.

        limits: a ResultLimits, the caps on what one site's result may download and unpack to (its defaults
        take whatever sites and registries send with theirs). download_dir: where each result's output archive
        and log are downloaded, in a temporary folder of their own that lasts as long as the RunResult
        (default: the system's temporary folder, $TMPDIR). ca_bundle: a PEM file of the CA certificates that
        sign the registry's, when a private CA does (default: the system's). Plain http:// to anything but
        this machine is logged as a warning."""
        self.url = url.rstrip("/")
        warning = plain_http_warning(self.url)
        if warning:
            log.warning("%s", warning)
        self.http = requests.Session()
        # Given with each request: a session's own verify loses to $REQUESTS_CA_BUNDLE (requests' #3829).
        self._verify = str(ca_bundle) if ca_bundle else None
        self.http.headers["Authorization"] = f"Bearer {token}"
        self.http.mount(self.url, HTTPAdapter(max_retries=READS_RETRIED))
        self.identities = [keys.load_identity(identity_file)] if identity_file else []
        self.limits = limits or ResultLimits()
        self.download_dir = download_dir
        # The small results that the last wait()'s answer carried, until results() takes them:
        # {(run id, "output" or "log"): (the sha256 the run lists, base64 text)}.
        self._carried = {}

    # --- keys for end-to-end encryption -----------------------------------------------------

    def register_public_key(self, public_key):
        """Let encrypted tasks be encrypted to this age public key (age1...)."""
        return self._call("POST", "/api/keys", json={"public_key": public_key})

    def public_keys(self):
        return self._call("GET", "/api/keys")

    # --- sites and tasks -------------------------------------------------------------------

    def sites(self):
        """Every site: name, online (polled recently), sparql_ok (its endpoint answered), last_seen_at."""
        return list(self._pages("/api/sites", {}))

    def submit(self, image, task_input, sites=None, session_id=None, name=None, timeout_seconds=None,
               description=None, encrypt=False, pin_digest=True):
        """Post a task; returns it, with its id, session_id and one run per site.

        task_input is the configuration file the algorithm reads as /input/input.txt: a dict or
        list (sent as JSON), a str (as text), bytes (byte for byte), or a pathlib.Path (that
        file's contents). sites=None means every site; session_id continues a session, whose
        tasks share each site's /temp/; timeout_seconds limits the algorithm at each site.
        With encrypt, sites encrypt output and log to your registered public keys: only your
        identity file opens them, the registry stores ciphertext.

        An image given by tag (name:tag) is posted pinned to the digest the tag names now
        (name:tag@sha256:...), as this machine's Docker engine learns it from the image registry:
        sites run only pinned images unless they chose otherwise, and a tag moved later then
        changes nothing. ImageNotPinned if it cannot be learnt; pin_digest=False posts the
        reference as written.
        """
        if pin_digest:
            image = pin_to_digest(image)
        body = {"image": image, "sites": sites, "session_id": session_id, "name": name,
                "description": description, "timeout_seconds": timeout_seconds, "encrypt": encrypt or None}
        body.update(_encode_input(task_input))
        return self._call("POST", "/api/tasks", json={key: value for key, value in body.items() if value is not None})

    def task(self, task_id):
        """The task with each site's run: status, reason, exit_code, image_digest, sparql, …"""
        return self._call("GET", f"/api/tasks/{task_id}")

    def tasks(self, session_id=None, status=None):
        """The caller's tasks, oldest first, optionally of one session and one status
        (active, completed, cancelled, finished_with_errors); fetched page by page as iterated."""
        query = {"session_id": session_id, "status": status}
        return self._pages("/api/tasks", {key: value for key, value in query.items() if value is not None})

    def cancel(self, task_id):
        """Stop the task's unfinished runs; returns the task as it is now."""
        return self._call("POST", f"/api/tasks/{task_id}/cancel")

    def run_history(self, run_id):
        """Every state one run went through, with times and reasons (expired leases included)."""
        return self._call("GET", f"/api/runs/{run_id}/history")

    # --- sessions --------------------------------------------------------------------------

    def sessions(self):
        """The caller's sessions, oldest first: id, created_at, closed_at (None while open), task_count;
        fetched page by page as iterated."""
        return self._pages("/api/sessions", {})

    def close_session(self, session_id):
        """Close a session once its tasks have ended: it takes no more tasks, and each site removes its
        /temp/ of the session. Closing it again changes nothing. Returns the session."""
        return self._call("POST", f"/api/sessions/{session_id}/close")

    # --- waiting and results ---------------------------------------------------------------

    def wait(self, task_id, timeout_seconds=600, progress=True):
        """The task once every run has ended, whichever way; TaskTimeout if that takes longer.

        With progress, each site's state is shown on standard error while waiting (in a
        terminal only; the display is removed when the wait ends).
        """
        deadline = time.monotonic() + timeout_seconds
        wait_seconds = 0
        with SiteProgress(task_id, enabled=progress) as display:
            while True:
                # with_results: the answer that ends the wait carries the small results (API 1.5; an older
                # registry ignores it), so that results() downloads only the others.
                task = self._call("GET", f"/api/tasks/{task_id}", timeout=60 + wait_seconds,
                                  params={"wait_seconds": wait_seconds, "with_results": "true"})
                display.show(task["runs"])
                if all(run["status"] in lifecycle.TERMINAL_STATES for run in task["runs"]):
                    self._carried = carried_results(task)
                    return task
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TaskTimeout(task, timeout_seconds)
                wait_seconds = max(1, min(PROGRESS_REFRESH_SECONDS, math.ceil(remaining)))

    def results(self, task_or_id, accept_partial=False):
        """Every site's RunResult for a task (a task dict or id).

        Unless accept_partial, raises TaskFailed when any site's run did not complete (it
        failed, was refused or cancelled, or has not ended yet), naming each site and why.
        """
        task = self.task(task_or_id) if isinstance(task_or_id, int) else task_or_id
        results = self._results_of(task["runs"], encrypted=bool(task.get("encrypted_to")))
        if not accept_partial and not all(result.ok for result in results):
            raise TaskFailed(task["id"], results)
        return results

    def wait_for_results(self, task_id, timeout_seconds=600, accept_partial=False, progress=True):
        """wait() then results(): every site's RunResult once all runs have ended."""
        return self.results(self.wait(task_id, timeout_seconds, progress), accept_partial)

    def result(self, run, encrypted=False):
        """One run's RunResult (run: as the task lists it), its output archive and log downloaded, each checked
        against the sha256 the registry lists for it and decrypted when encrypted, into a temporary folder
        that lasts as long as the result (see RunResult).

        Raises ChecksumMismatch, ResultTooLarge (before writing past a cap of self.limits) or DecryptionFailed.
        """
        problem = run_problem(run)
        if problem:
            raise RegistryError(f"the registry listed a run the library cannot use: {problem}")
        downloads = DownloadFolder(self.download_dir, run["id"])
        try:
            archive = self._download(run, "output", "max_archive_bytes", downloads, encrypted)
            log = self._download(run, "log", "max_log_bytes", downloads, encrypted)
        except BaseException:
            downloads.close()
            raise
        # .get: registries before API 1.1 do not send the SPARQL summary.
        return RunResult(run_id=run["id"], site=run["site"], status=run["status"], reason=run["reason"],
                         exit_code=run["exit_code"], image_digest=run["image_digest"], sparql=run.get("sparql"),
                         archive_path=archive, log_path=log, limits=self.limits, downloads=downloads)

    def _results_of(self, runs, encrypted):
        """result() of each run, in the runs' order, PARALLEL_DOWNLOADS at a time: the registry sends one while
        the library checks and writes another. If any fails, none is kept: what downloaded is removed, and the
        error of the first run that failed, in the runs' order, is raised."""
        pool = futures.ThreadPoolExecutor(PARALLEL_DOWNLOADS, thread_name_prefix="pht-download")
        try:
            downloading = [pool.submit(self.result, run, encrypted) for run in runs]
            futures.wait(downloading)
        finally:
            pool.shutdown(cancel_futures=True)  # on an interrupt: the downloads under way end, no more begin
        failed = [download.exception() for download in downloading if download.exception() is not None]
        if failed:
            for download in downloading:
                if download.exception() is None:
                    download.result().close()
            raise failed[0]
        return [download.result() for download in downloading]

    def _download(self, run, kind, limit, downloads, encrypted):
        """The run's output or log (kind) as a file in downloads, None when it has none."""
        sha256 = run[f"{kind}_sha256"]
        if sha256 is None:
            return None
        subject, cap = describe_file(kind, run["id"], run["site"]), getattr(self.limits, limit)
        if (run.get(f"{kind}_size") or 0) > cap:
            raise ResultTooLarge(subject, limit, cap)
        if encrypted:
            keys.require_identity(self.identities, subject)  # before downloading what could not be opened
        # The registry's sha256 and size are of the file as the site sent it: the ciphertext when encrypted.
        target = downloads.path / kind
        received = target.with_suffix(".age") if encrypted else target
        self._receive(run["id"], kind, received, sha256, subject, limit, cap)
        if encrypted:
            keys.decrypt_file(received, target, self.identities, subject)
            received.unlink()
        return target

    def _receive(self, run_id, kind, target, sha256, subject, limit, cap):
        """The run's output or log (kind) to the file target, as the last wait() carried it or downloaded piece by
        piece; hashed as it comes, never more than cap bytes."""
        carried = self._carried.pop((run_id, kind), None)
        if carried is not None and carried[0] == sha256:
            if len(carried[1]) > 4 * math.ceil(cap / 3):  # refused before it is decoded, as a download at its cap
                raise ResultTooLarge(subject, limit, cap)
            self._keep([_decoded(carried[1], subject)], target, sha256, subject, limit, cap)
            return
        # Identity: a body compressed on the way would be unpacked by urllib3 before the cap could count it.
        with self._request("GET", f"/api/runs/{run_id}/{kind}", stream=True, timeout=60,
                           headers={"Accept-Encoding": "identity"}) as answer:
            self._keep(answer.raw.stream(DOWNLOAD_CHUNK_BYTES, decode_content=False), target, sha256, subject,
                       limit, cap)

    @staticmethod
    def _keep(pieces, target, sha256, subject, limit, cap):
        digest, size = hashlib.sha256(), 0
        with open(target, "wb") as file:
            for piece in pieces:
                size += len(piece)
                if size > cap:
                    raise ResultTooLarge(subject, limit, cap)
                digest.update(piece)
                file.write(piece)
        if digest.hexdigest() != sha256:
            raise ChecksumMismatch(f"{subject} that the registry sent has sha256 {digest.hexdigest()}, not the "
                                   f"{sha256} it lists: download it again; if it stays so, the registry's copy is "
                                   "damaged or the registry is not to be trusted")

    # --- HTTP ------------------------------------------------------------------------------

    def _pages(self, path, query):
        page = 1
        while True:
            answer = self._call("GET", path, params={**query, "page": page, "per_page": PAGE_SIZE})
            yield from answer["items"]
            if page * PAGE_SIZE >= answer["total"]:
                return
            page += 1

    def _call(self, method, path, timeout=60, **kwargs):
        return self._request(method, path, timeout=timeout, **kwargs).json()

    def _request(self, method, path, **kwargs):
        try:
            response = self.http.request(method, self.url + path, **kwargs, verify=self._verify)
        except requests.exceptions.SSLError:
            raise RegistryError(f"the registry at {self.url} did not prove who it is (its TLS certificate was not "
                                "verified); if a private CA signs it, give that CA's bundle: ca_bundle in the "
                                "config file or PHT_CA_BUNDLE") from None
        except requests.ConnectionError as error:
            raise RegistryError(f"cannot reach the registry at {self.url} ({type(error).__name__}); "
                                "is the URL right and the registry running?") from None
        if not response.ok:
            raise RegistryError(_error_message(response))
        return response


def _encode_input(task_input):
    """The task's configuration file as the registry takes it: text as `input`, anything else as base64."""
    if isinstance(task_input, os.PathLike):
        task_input = Path(task_input).read_bytes()
    if isinstance(task_input, (dict, list)):
        task_input = json.dumps(task_input)
    if isinstance(task_input, str):
        return {"input": task_input}
    if isinstance(task_input, bytes):
        return {"input_base64": base64.b64encode(task_input).decode("ascii")}
    raise TypeError(f"task input must be a dict, list, str, bytes or pathlib.Path, not {type(task_input).__name__}")


def carried_results(task):
    """Pure: the small results an ended task's answer carries (with_results), taken out of its runs:
    {(run id, kind): (the sha256 the run lists, base64 text)}. What is not text is left out (and downloaded)."""
    carried = {}
    for run in task["runs"]:
        for kind in ("output", "log") if isinstance(run, dict) else ():
            text = run.pop(f"{kind}_base64", None)
            if isinstance(text, str) and type(run.get("id")) is int:  # run_problem() names a run without one
                carried[(run["id"], kind)] = (run.get(f"{kind}_sha256"), text)
    return carried


def _decoded(text, subject):
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or characters that are not ASCII
        raise RegistryError(f"{subject} that the registry sent within its task is not base64: ask the "
                            "registry's operator") from None


def run_problem(run):
    """Pure: what in a run, as the registry listed it, the library cannot use safely (its id names a folder, its
    sizes are compared, its checksums checked), or None."""
    if type(run.get("id")) is not int or not isinstance(run.get("site"), str):
        return f"no whole-number id and site name in {shown(run)}"
    for kind in ("output", "log"):
        sha256, size = run.get(f"{kind}_sha256"), run.get(f"{kind}_size")
        if not (sha256 is None or (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256))):
            return f"run {run['id']}'s {kind}_sha256 is not a sha256: {shown(sha256)}"
        if not (size is None or type(size) is int):
            return f"run {run['id']}'s {kind}_size is not a whole number: {shown(size)}"
    return None


def _error_message(response):
    hint = {401: " (is the token right? the registry's operator issues it)",
            403: " (this token is not a researcher's)"}.get(response.status_code, "")
    try:
        body = response.json()
        message = body.get("message", "")
        if body.get("detail"):
            message += f": {json.dumps(body['detail'])}"
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        message = response.text.strip()[:200]
    return escaped(f"registry answered {response.status_code} {message}{hint}")
