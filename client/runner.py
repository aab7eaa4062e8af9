"""The site runner's work, readable top to bottom.

Loop: claim the next run (long-poll) → check the image against the whitelist →
pull it → run it contained, heartbeating meanwhile → pack /output → upload
output and log → report how it ended. Nothing in here accepts inbound connections.
"""

import logging
import shutil
import threading

import docker.errors
import requests
from SPARQLWrapper import JSON, SPARQLWrapper

from client import containers, image_policy, output_archive
from client.registry_client import LeaseLost, RegistryRefused

log = logging.getLogger("pht.runner")

UNREACHABLE_RETRY_SECONDS = 5


class SiteRunner:
    def __init__(self, config, engine, registry):
        self.config = config
        self.engine = engine
        self.registry = registry
        self.stopping = threading.Event()

    def run_until_stopped(self, once=False):
        while not self.stopping.is_set():
            try:
                run = self.registry.claim_run(self.config.long_poll_seconds, self.sparql_endpoint_answers())
            except requests.ConnectionError as error:
                log.warning("registry %s unreachable (%s); trying again in %d s",
                            self.config.registry_url, type(error).__name__, UNREACHABLE_RETRY_SECONDS)
                self.stopping.wait(UNREACHABLE_RETRY_SECONDS)
                continue
            if run is None:
                continue
            self.execute_run(run)
            if once:
                return

    def sparql_endpoint_answers(self):
        endpoint = SPARQLWrapper(self.config.sparql_endpoint)
        endpoint.setQuery("ASK { ?s ?p ?o }")
        endpoint.setReturnFormat(JSON)
        endpoint.setTimeout(5)
        try:
            endpoint.query().convert()
            return True
        except Exception as error:  # any failure means "does not answer"; the runner goes on
            log.warning("SPARQL endpoint %s does not answer: %s", self.config.sparql_endpoint, error)
            return False

    def execute_run(self, run):
        run_id, lease_id = run["id"], run["lease_id"]
        log.info("run %s (task %s, session %s): image %s", run_id, run["task_id"], run["session_id"], run["image"])
        reason = image_policy.refusal_reason(run["image"], self.config.whitelist, self.config.require_digest)
        if reason:
            log.warning("run %s refused: %s", run_id, reason)
            self.registry.refuse(run_id, lease_id, reason)
            return
        folder = self.config.work_dir / "runs" / str(run_id)
        heartbeat = _Heartbeat(self.registry, run_id, lease_id, run["lease_seconds"])
        heartbeat.start()
        try:
            self._run_and_report(run, folder, heartbeat)
        except LeaseLost as error:
            log.warning("run %s: the registry took the run back (%s); dropping its results", run_id, error)
        finally:
            heartbeat.stop()
        shutil.rmtree(folder, ignore_errors=True)

    def _run_and_report(self, run, folder, heartbeat):
        run_id, lease_id = run["id"], run["lease_id"]
        paths = _prepare_folders(folder, self.config.work_dir / "sessions" / str(run["session_id"]))
        self.registry.download_input(run_id, paths["input"] / "input.txt")
        reference = image_policy.parse_image_reference(run["image"])
        try:
            pinned = containers.pull_image(self.engine, reference)
        except docker.errors.APIError as error:
            self.registry.finish(run_id, lease_id, None, f"pulling {reference.pull_reference} failed: {error.explanation}")
            return
        self.registry.report_started(run_id, lease_id, pinned.rpartition("@")[2] or pinned)
        limits = self.config.container
        timeout = min(run["timeout_seconds"] or limits.timeout_seconds, limits.timeout_seconds)
        outcome = containers.run_contained(
            self.engine, pinned,
            mounts=[(paths["input"], "/input", "ro"), (paths["output"], "/output", "rw"),
                    (paths["temp"], "/temp", "rw")],
            environment={"SPARQL_ENDPOINT": self.config.sparql_endpoint, "TASK_ID": str(run["task_id"]),
                         "SESSION_ID": str(run["session_id"]), "RUN_ID": str(run["session_id"])},
            limits=limits,
            labels={containers.LABEL_PREFIX + "run": str(run_id), containers.LABEL_PREFIX + "task": str(run["task_id"])},
            timeout_seconds=timeout,
            should_stop=heartbeat.should_stop,
            log_path=paths["log"])
        if heartbeat.should_stop():
            log.info("run %s was cancelled or taken back; nothing is uploaded", run_id)
            return
        failure_reason = outcome.failure_reason
        if failure_reason is None:
            try:
                skipped = output_archive.pack_output(paths["output"], paths["archive"], limits.max_output_bytes)
                if skipped:
                    with open(paths["log"], "a", encoding="utf-8") as log_file:
                        log_file.write(f"\n[pht-runner] not uploaded (links or special files): {', '.join(skipped)}\n")
                self.registry.upload(run_id, lease_id, "output", paths["archive"])
            except output_archive.OutputTooLarge as error:
                failure_reason = str(error)
        self.registry.upload(run_id, lease_id, "log", paths["log"])
        self.registry.finish(run_id, lease_id, outcome.exit_code, failure_reason)
        log.info("run %s finished: exit code %s%s", run_id, outcome.exit_code,
                 f", failed: {failure_reason}" if failure_reason else "")


def _prepare_folders(folder, session_folder):
    paths = {"input": folder / "input", "output": folder / "output", "temp": session_folder / "temp",
             "log": folder / "log.txt", "archive": folder / "output.tar.gz"}
    for key in ("input", "output", "temp"):
        paths[key].mkdir(parents=True, exist_ok=True)
    # The container runs as an unprivileged user that must be able to write its results.
    paths["output"].chmod(0o777)
    paths["temp"].chmod(0o777)
    return paths


class _Heartbeat:
    """Extends the run's lease in the background and notices a cancel or a lost lease."""

    def __init__(self, registry, run_id, lease_id, lease_seconds):
        self.registry, self.run_id, self.lease_id = registry, run_id, lease_id
        self.interval = max(1.0, lease_seconds / 3)
        self._done = threading.Event()
        self._stop_work = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def should_stop(self):
        return self._stop_work.is_set()

    def _beat(self):
        while not self._done.wait(self.interval):
            try:
                if self.registry.heartbeat(self.run_id, self.lease_id) == "cancelled":
                    log.info("run %s was cancelled by the researcher", self.run_id)
                    self._stop_work.set()
            except LeaseLost:
                self._stop_work.set()
            except (RegistryRefused, OSError) as error:
                log.warning("heartbeat for run %s failed: %s", self.run_id, error)
