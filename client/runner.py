"""The site runner's work, readable top to bottom.

The main loop (one thread):
    carry on with unfinished runs (from before a restart) → load dropped image archives →
    wait for a free slot → claim the next run (long-poll; says whether the SPARQL endpoint
    answers) → refuse it (whitelist) or hand it to a worker.

A worker (one thread per run, up to max_concurrent_runs):
    fetch the image, pinned → report started (unless the claim started it) → open the run's
    SPARQL gateway and take the relay its session kept, or start one → create the contained,
    labelled container in the relay's network namespace → run it while a heartbeat thread
    keeps the lease (and notices a cancel) → close the gateway → pack /output → upload output
    and log → report how it ended, with what the gateway saw → remove its container, keep its
    relay for the session's next run (relay_pool.py) → delete the run's folder.

Each step is recorded in the run's folder (run_folder.py) before the next one starts,
so a runner killed at any moment carries on where it was at its next start: a
container that ran is never started again, and a result is uploaded until the
registry confirms it. Nothing in here accepts inbound connections.
"""

import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass

import docker
import requests

from client import airlock_checks, approvals, containers, deliveries, disk_limits, image_policy, output_archive
from client.audit_log import AuditLog, AuditLogBroken
from client.claim import InvalidClaim
from client.encryption import encrypt_once, keys_for
from client.image_source import ImageSource, ImageUnavailable
from client.log_keeper import LogFollower
from common.printable import escaped, printable
from common.transport import plain_http_warning
from client.registry_client import (RUNNER_VERSION, TRANSIENT_ERRORS, InputTooLarge, LeaseLost, Outage, RegistryRefused,
                                    TokenRefused, Unreachable, request_problem, sha256_of)
from client.relay_pool import RelayPool
from client.run_folder import RunFolder, SpareRunFolder, parked_run, unfinished_runs
from client.session_folders import SessionFolders, sessions_to_remove
from client.sparql_gateway import (CONNECTIONS_PER_RUN, ENDPOINT_IN_CONTAINER, SELF_TEST_SCRIPT, QueryLog, RunGateway,
                                   Upstream, endpoint_problem, query_log_path, read_query_log, summarize)
from client.sparql_parsing import ParserPool
from master import lifecycle

log = logging.getLogger("pht.runner")

HEARTBEAT_RETRY_SECONDS = 1
OUTPUT_CHECK_SECONDS = 2
MAX_REASON_CHARS = 2000  # the registry's limit for a failure reason
MAX_OWN_LOG_BYTES = 10 * 1024 ** 2  # of a PyTaskManager image's /log.txt, added to the run's log
MAX_NAMES_SHOWN = 10  # of the researchers whose keys are pinned, in the start-up summary
APPROVAL_POLICY_MEANINGS = {
    approvals.WHITELIST: "an image the whitelist allows runs at once",
    approvals.APPROVE_NEW_DIGESTS: "an image digest runs once the IT officer approved it (runScript.py approvals)",
    approvals.APPROVE_EVERY_TASK: "every run waits for the IT officer's approval (runScript.py approvals)",
}


class RunTakenBack(Exception):
    """The researcher cancelled the run, or its lease ran out and the registry gave it up."""


class RunParked(Exception):
    """The run waits for the site's IT officer (approval, or review of its output): it leaves its worker slot."""


class WrongIdentity(Exception):
    """The registry does not accept this site's token, or knows it as another site's: the runner must stop.
    The message is the one line the IT officer sees, naming what to do."""


class SiteRunner:
    def __init__(self, config, engine, registry):
        self.config = config
        self.engine = engine
        self.registry = registry
        self.runs_dir = config.work_dir / "runs"
        self.output_disk = None  # disk_limits.DiskSize of each run's filesystem; None: polled (disk_limits polling)
        # The next run's folder, its filesystem made ahead (with output_disk only; one left from before goes at start).
        self.spare_folder = SpareRunFolder(config.work_dir / "spare-run")
        self.sessions = SessionFolders(config.work_dir / "sessions", temp_size=None)
        self._sessions_asked_at = None  # when the registry was last asked which sessions are closed
        self.images = ImageSource(engine, config.image_import_folder, config.work_dir / "imported-images.json")
        self.approvals = approvals.ApprovalStore(config.work_dir / "approvals.sqlite")
        self.audit = AuditLog(config.work_dir / "audit.jsonl")
        self.audit_broken = None  # set when the audit log can take no more entries: the runner stops
        self._parked_asked_at = None  # when the registry was last asked whether parked runs were cancelled
        self._runs_parked = False  # whether a run waits for a person at the site: claims then wait less
        self.config_source = None  # site_config.ConfigSource: the config file, taken up again when it changes
        self.config_changed = threading.Event()  # set on SIGHUP
        self.stopping = threading.Event()
        self._workers = {}  # run id -> Worker
        self._workers_changed = threading.Condition()
        self._sparql_problem = "not checked yet"
        self.registry_outage = Outage()  # the main loop's problems reaching the registry, logged once each
        # Parked runs' heartbeats fail with words of their own (their URL): kept apart, they do not take turns
        # with the claims' problem at being new.
        self.parked_outage = Outage()
        self._online = False  # a claim came back since the start, or since the registry's last problem
        self._said_online = False  # "online at ..., waiting for work" was logged (once per start)
        self.wrong_identity = None  # set when the registry stops accepting the token
        self.upstream = Upstream(config.sparql_endpoint, CONNECTIONS_PER_RUN * config.max_concurrent_runs + 1)
        self._gateways = {}  # run id -> its open RunGateway
        self._gateways_lock = threading.Lock()
        self.parser = ParserPool()
        self._relay_image = None
        self.relays = RelayPool(engine, config.work_dir / "relays", config.max_concurrent_runs)

    # --- the main loop -------------------------------------------------------

    def run_until_stopped(self, once=False):
        """Raises WrongIdentity if the registry does not take this site's token as this site's, and
        disk_limits.DiskLimitsUnavailable if this machine cannot hold algorithms to the site's disk limits."""
        self.size_disks()
        self.check_identity()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.remove_unrecorded_containers()
        self.relays.remove_left_over()
        try:  # whatever stops the runner from here leaves no spare filesystem mounted and no parser running
            self.make_spare_folder()
            if uses_gateway(self.config):
                self.parser.start()
                self._relay_image = containers.relay_image(self.engine, self.config.sparql_gateway.relay_base_image)
                self.note_sparql_problem(self.gateway_self_test())
            else:
                self.check_sparql_endpoint()
            self.take_runs(once)
        finally:
            self.parser.close()
            self.relays.close()
            self.remove_spare_folder()

    def size_disks(self):
        """The filesystems' sizes for the site's limits, found by making one of each (disk_limits.calibrate)."""
        self.remove_spare_folder()  # one an earlier runner left was made for the limits it had, if it had any
        limits = self.config.container
        if limits.disk_limits != "filesystem":
            log.warning("container.disk_limits is polling: an algorithm's output is measured every %d s, so it can "
                        "write more than max_output_bytes meanwhile, and /temp has no limit", OUTPUT_CHECK_SECONDS)
            return
        scratch = self.config.work_dir / "disk-check"
        self.output_disk = disk_limits.calibrate(scratch, limits.max_output_bytes, limits.max_output_files)
        temp_disk = disk_limits.calibrate(scratch, limits.max_temp_bytes, limits.max_temp_files)
        self.sessions = SessionFolders(self.sessions.sessions_dir, temp_disk)
        self.spare_folder.size = self.output_disk
        for where, size in (("/output", self.output_disk), ("/temp", temp_disk)):
            log.info("%s: a filesystem of %d bytes per %s, for %d bytes in %d files (at most %d bytes over the limit "
                     "on this machine's disk)",
                     where, size.image_bytes, "run" if where == "/output" else "session", size.max_bytes,
                     size.max_files, size.overshoot_bytes)

    def make_spare_folder(self):
        """The next run's folder, made while no run waits for it (SpareRunFolder); without one, a run makes its own."""
        if self.spare_folder.size is None or self.stopping.is_set():  # None: disk_limits polling
            return
        try:
            self.spare_folder.make()
        except (disk_limits.DiskProblem, OSError) as error:
            log.warning("the next run's filesystem could not be made ahead (%s); the run makes it", error)

    def remove_spare_folder(self):
        try:
            self.spare_folder.remove()
        except disk_limits.DiskProblem as error:
            log.warning("the spare run folder could not be removed (%s); it is removed at the next start", error)

    def take_runs(self, once):
        """The main loop, until stopped (or one claim with once)."""
        while not self.stopping.is_set():
            self.take_up_config_changes()
            self.carry_on_unfinished_runs()
            self.take_up_parked_runs()
            self.remove_finished_sessions()
            self.images.load_dropped_archives()
            if not self.wait_for_free_slot():
                continue
            # A run whose worker just ended unreported (the registry did not answer) takes a freed slot first:
            # else each outage would leave one more run's files waiting beside the runs claimed meanwhile.
            self.carry_on_unfinished_runs()
            if not self.wait_for_free_slot(timeout=0):
                continue
            run = self.claim_next_run(once)
            if run is not None:
                self.take_on(run)
            if once:
                break
        self.wait_for_workers()

    def check_identity(self):
        """Before anything else: whose token is this? Asked until the registry answers (or the runner stops)."""
        while not self.stopping.is_set():
            try:
                name = self.registry.site_name()
            except TokenRefused as error:
                raise WrongIdentity(token_refused(self.config, error)) from None
            except requests.exceptions.SSLError:
                raise WrongIdentity(certificate_refused(self.config)) from None
            except (*TRANSIENT_ERRORS, RegistryRefused) as error:
                self.note_registry_problem(registry_problem(error, self.config.registry_url))
                self.stopping.wait(self.config.poll_interval_seconds)
                continue
            if name is None:
                log.warning("registry %s cannot say which site this token belongs to (no /api/site/me); "
                            "site_name %s is not checked", self.config.registry_url, self.config.site_name)
            elif name != self.config.site_name:
                raise WrongIdentity(
                    f"site_name is {self.config.site_name!r}, but the registry {self.config.registry_url} knows this "
                    f"token as site {printable(name)!r}: use {self.config.site_name}'s own token, or correct site_name")
            return

    def remove_unrecorded_containers(self):
        """Containers the runner created but was stopped before noting (so they never started)."""
        recorded = {folder.state.get(name) for folder in unfinished_runs(self.runs_dir)
                    for name in ("container_id", "relay_container_id")}
        for container in containers.containers_of(self.engine, self.config.site_name, self.config.work_dir):
            if container.id not in recorded:
                log.info("removing container %s of run %s: no run of this runner records it",
                         container.short_id, container.labels.get(containers.RUN_LABEL))
                containers.remove(self.engine, container.id)

    def runs_without_worker(self):
        """unfinished_runs but those a worker has."""
        with self._workers_changed:
            busy = set(self._workers)
        return unfinished_runs(self.runs_dir, busy)

    def carry_on_unfinished_runs(self):
        for folder in self.runs_without_worker():
            if not folder.state.get("parked"):
                log.info("run %s: carrying on where it was (%s)", folder.run_id, progress_of(folder.state))
                self.start_worker(folder)

    def take_up_config_changes(self):
        """The reloadable fields of the config file (site_config.RELOADABLE), once it changed or on SIGHUP."""
        source = self.config_source
        if source is None or not (source.changed() or self.config_changed.is_set()):
            return
        self.config_changed.clear()
        fresh = source.reload(self.config)
        if fresh is None or fresh == self.config:
            return
        self.config = fresh
        whitelist, airlock = [pattern.pattern for pattern in fresh.whitelist], fresh.airlock
        log.info("config taken up again: approval_policy %s, whitelist %s, require_digest %s, airlock review %s",
                 fresh.approval_policy, json.dumps(whitelist), fresh.require_digest, airlock.review)
        for warning in whitelist_warnings(fresh.whitelist):
            log.warning("%s", warning)
        self.record("config_changed", approval_policy=fresh.approval_policy, whitelist=whitelist,
                    require_digest=fresh.require_digest, airlock_review=airlock.review,
                    airlock_checks=repr(airlock.checks))

    def take_up_parked_runs(self, now=None):
        """Act on what the IT officer decided about runs that wait (runScript.py approvals / outputs): go on with
        them, as far as worker slots allow, or end them; and let go of those the researcher cancelled meanwhile
        (the registry is asked at most once per poll interval)."""
        now = time.time() if now is None else now
        parked = [folder for folder in self.runs_without_worker() if folder.state.get("parked")]
        self._runs_parked = bool(parked)
        due = self._parked_asked_at is None or now - self._parked_asked_at >= self.config.poll_interval_seconds
        if parked and due:
            self._parked_asked_at = now
        for folder in parked:
            try:
                # One try each (heartbeat, not the retried run_status): a registry that does not answer holds up
                # neither the main loop nor the other parked runs.
                if due and self.registry.heartbeat(folder.run_id, folder.claim.lease_id) == lifecycle.CANCELLED:
                    self.record(lifecycle.CANCELLED, folder.run_id, waiting=folder.state["parked"])
                    log.info("run %s: cancelled by the researcher while it waited", folder.run_id)
                    self.clean_up(folder)
                    continue
                decision = self.decision_on(folder, now)
                if decision is not None and self.slots_taken() < self.config.max_concurrent_runs:
                    self.go_on_with(folder, *decision)
            except LeaseLost as error:
                log.info("run %s: %s; its files are removed", folder.run_id, error)
                self.record("taken_back", folder.run_id, reason=str(error))
                self.clean_up(folder)
            except (*TRANSIENT_ERRORS, RegistryRefused, Unreachable) as error:
                self.note_registry_problem(registry_problem(error, self.config.registry_url), self.parked_outage)

    def decision_on(self, folder, now):
        """What the IT officer decided about a parked run: (what, reason) or None while undecided."""
        if folder.state["parked"] == lifecycle.AWAITING_APPROVAL:
            denial = self.approvals.denial_of(folder.claim_key)
            if denial:
                return "denied", f"denied by the site's IT officer ({denial.denied_by}): {denial.reason}"
            if self.approval_wait(folder, now)[0] is None:
                return "approved", None
            return None
        review = self.approvals.review_of(folder.claim_key)
        if review is None:
            return None
        if review.released:
            return "released", None
        return "rejected", f"its output was rejected by the site's IT officer ({review.reviewed_by}): {review.reason}"

    def go_on_with(self, folder, decision, reason):
        """Carry out the IT officer's decision on a parked run."""
        run = folder.claim
        if decision == "denied":
            self.registry.refuse(run.id, run.lease_id, shortened(reason))
            self.record(lifecycle.REFUSED, run.id, reason=reason)
            log.info("run %s refused: %s", run.id, reason)
            self.clean_up(folder)
            return
        self.registry.resume(run.id, run.lease_id)
        if decision == "rejected":
            folder.record(outcome={**folder.state["outcome"], "failure_reason": reason}, withheld=True)
        if decision in ("released", "rejected"):
            folder.record(reviewed=decision)
        folder.record(parked=None)
        self.record(f"resumed_{decision}", run.id)
        log.info("run %s: %s by the site's IT officer; it goes on", run.id, decision)
        self.start_worker(folder)

    def record(self, event, run_id=None, **fields):
        """An entry in the site's audit log. A log that can take no more entries stops the runner (it says why),
        for a site must not run what it cannot account for."""
        try:
            self.audit.append(event, run=run_id, **fields)
        except AuditLogBroken as error:
            if self.audit_broken is None:
                log.error("%s", error)
            self.audit_broken = error
            self.stopping.set()
            raise

    def remove_finished_sessions(self, now=None):
        """Remove the /temp of sessions the researcher closed, or that no run used for session_idle_seconds.
        The registry is asked at most once per poll interval, and only about folders no run uses now."""
        now = time.time() if now is None else now
        held = self.sessions.held()
        with self._workers_changed:
            active = {worker.session_id for worker in self._workers.values()}
        closed, not_in_use = set(), set(held) - active
        due = self._sessions_asked_at is None or now - self._sessions_asked_at >= self.config.poll_interval_seconds
        if not_in_use and due:
            self._sessions_asked_at = now
            try:
                closed = self.registry.closed_sessions(not_in_use) or set()
            except (*TRANSIENT_ERRORS, RegistryRefused) as error:
                # Not worth a warning of its own: the claim that follows says whether the registry answers.
                log.debug("which sessions are closed: %s", registry_problem(error, self.config.registry_url))
        removable = sessions_to_remove(held, active, closed, now, self.config.session_idle_seconds,
                                       self.config.max_sessions)
        for session_id, why in removable.items():
            self.sessions.remove(session_id, why)
        self.relays.remove_unused(removable)

    def check_sparql_endpoint(self):
        """Whether the endpoint answers a query sent as the gateway sends algorithms' queries (before every poll;
        the rest of an algorithm's path was tested at start-up, and its relay is checked with every run)."""
        return self.note_sparql_problem(endpoint_problem(self.upstream))

    def gateway_self_test(self):
        """What an algorithm would see: an ASK sent from a container, through a relay and a gateway like a run's.
        None if it was answered, else what went wrong."""
        folder = self.config.work_dir / "gateway-self-test"
        shutil.rmtree(folder, ignore_errors=True)
        labels = containers.labels_for(self.config.site_name, self.config.work_dir, task_id=0, run_id=0)
        gateway = self.new_gateway(0, 0, folder / "gateway", QueryLog(folder / "queries.jsonl", 0, 0, True))
        gateway.open()
        started = []
        try:
            relay = containers.create_relay(self.engine, self._relay_image, folder / "gateway", labels)
            started.append(relay.id)
            containers.start(relay)
            containers.wait_until_listening(relay)
            probe = containers.create_contained(self.engine, self._relay_image, [], {}, self.config.container, labels,
                                                f"container:{relay.id}", ["python3", "-c", SELF_TEST_SCRIPT])
            started.append(probe.id)
            probe.start()
            exit_code = probe.wait(timeout=60)["StatusCode"]
            output = probe.logs().decode("utf-8", "replace").strip()
        except (containers.RelayFailed, docker.errors.DockerException, requests.RequestException) as error:
            return f"the SPARQL gateway's self-test could not run: {error}"
        finally:
            gateway.close()
            for container_id in started:
                containers.remove(self.engine, container_id)
            shutil.rmtree(folder, ignore_errors=True)
        if exit_code != 0:
            last_line = output.splitlines()[-1] if output else f"exit code {exit_code}"
            return f"a query from a container through the SPARQL gateway failed: {last_line}"
        return None

    def note_sparql_problem(self, problem):
        """Logged when it changes, so a dead endpoint warns once; returns whether the endpoint answers."""
        if problem != self._sparql_problem:
            if problem:
                log.warning("SPARQL endpoint %s does not answer: %s (runs go on; algorithms that query it "
                            "will fail)", self.config.sparql_endpoint, problem)
            else:
                log.info("SPARQL endpoint %s answers", self.config.sparql_endpoint)
        self._sparql_problem = problem
        return problem is None

    def claim_next_run(self, once=False):
        """The site's next run; None if none came within the long-poll, or the registry did not answer."""
        wait_seconds = claim_wait_seconds(self.config.long_poll_seconds, self._online, once,
                                          self.config.poll_interval_seconds if self._runs_parked else None)
        try:
            # Where no run waits for the IT officer's approval, the registry may start it with the claim.
            run = self.registry.claim_run(wait_seconds, self.check_sparql_endpoint(), self.stopping,
                                          start_pinned=self.config.approval_policy == approvals.WHITELIST)
        except TokenRefused as error:  # revoked while the runner ran: claim nothing more, say why at the end
            self.wrong_identity = WrongIdentity(token_refused(self.config, error))
            self.stopping.set()
            return None
        except (*TRANSIENT_ERRORS, RegistryRefused) as error:
            self._online = False
            self.note_registry_problem(registry_problem(error, self.config.registry_url))
        except InvalidClaim as error:
            if not self.stopping.is_set():  # a claim given up on because the runner stops is no claim at all
                self.refuse_invalid_claim(error)
        else:
            self.note_claim_answered()
            if run is not None or self.config.long_poll_seconds > 0:
                return run
            # long_poll_seconds 0: ask, and when there is nothing, ask again after the interval
            # (the original PyTaskManager's way; kept for registries without long-polls).
        self.stopping.wait(self.config.poll_interval_seconds)
        return None

    def refuse_invalid_claim(self, error):
        """A claim the runner will not act on: refused at the registry when it can be named, else only logged.
        Either way the runner waits a poll interval, so a registry that sends nothing else is not asked in a loop."""
        reason = f"the site runner refused the claim: {error}"
        log.warning("invalid claim from the registry: %s", error)
        self.record("invalid_claim", reason=str(error), run_id=error.run_id)
        if error.refusable:
            try:
                self.registry.refuse(error.run_id, error.lease_id, shortened(reason))
            except (LeaseLost, Unreachable, RegistryRefused) as failure:
                log.warning("run %s: the refusal was not recorded: %s", error.run_id, failure)

    def note_registry_problem(self, problem, outage=None):
        """Logged when it begins or changes and every few minutes while it lasts (registry_client.Outage), so an
        outage does not flood the log."""
        said = (outage or self.registry_outage).failed(problem, time.monotonic())
        if said:
            log.warning("%s; asking again every %g s", said, self.config.poll_interval_seconds)

    def note_claim_answered(self):
        """The registry answered a claim: said once after the start, and once after each problem claims had. (A
        problem of another request, such as a parked run's heartbeat, is not ended by a claim: else it would be said
        again at every poll.)"""
        if self._online:
            return
        self._online = True
        self.registry_outage.answered()
        if self._said_online:
            log.info("registry %s answers again; waiting for work", escaped(self.config.registry_url))
        else:
            log.info("online at %s, waiting for work", escaped(self.config.registry_url))
            self._said_online = True

    def slots_taken(self):
        """Worker slots (max_concurrent_runs) in use: by every worker but those that only clean up (slot_freed)."""
        return sum(not worker.slot_freed for worker in list(self._workers.values()))

    def wait_for_free_slot(self, timeout=1):
        with self._workers_changed:
            self._workers_changed.wait_for(
                lambda: self.slots_taken() < self.config.max_concurrent_runs or self.stopping.is_set(), timeout)
            return self.slots_taken() < self.config.max_concurrent_runs and not self.stopping.is_set()

    def take_on(self, run):
        log.info("run %s (task %s, session %s): image %s", run.id, run.task_id, run.session_id, run.image)
        self.record(lifecycle.CLAIMED, run.id, task=run.task_id, session=run.session_id, researcher=run.researcher,
                    image=run.image)
        stale = self._workers.get(run.id)
        if stale:
            # The registry hands a run out again only once the lease held on it before ran out.
            stale.heartbeat.stop_work("the registry handed the run out again")
            stale.thread.join()
        reason = (image_policy.refusal_reason(run.image, self.config.whitelist, self.config.require_digest)
                  or keys_for(run, self.config.researcher_keys)[1] or self.parked_already(run))
        if reason is None:
            try:
                self.start_worker(RunFolder.create(self.runs_dir, run, self.spare_folder))
                return
            except (disk_limits.DiskProblem, OSError) as error:
                # A folder left from an earlier claim of this run that cannot be removed, say: not this loop's end.
                reason = f"the site could not prepare the run's folder: {error}"
        log.warning("run %s refused: %s", run.id, reason)
        self.record(lifecycle.REFUSED, run.id, reason=reason)
        try:
            self.registry.refuse(run.id, run.lease_id, reason)
        except (LeaseLost, Unreachable, RegistryRefused) as error:
            # The lease runs out, the run comes back, and it is refused again then.
            log.warning("run %s: the refusal was not recorded: %s", run.id, error)

    def parked_already(self, run):
        """Why a claim is refused when the run waits here under an earlier claim: an honest registry never hands
        out a parked run again, and the officer's view of it must not change under them."""
        folder = parked_run(self.runs_dir, run.id)
        if folder is None:
            return None
        return (f"run {run.id} is {folder.state['parked']} at this site under an earlier claim; the registry "
                "handed it out again")

    def start_worker(self, folder):
        run = folder.claim
        heartbeat = Heartbeat(self.registry, run.id, run.lease_id, run.lease_seconds)
        worker = Worker(session_id=run.session_id, heartbeat=heartbeat, thread=threading.Thread(
            target=self.work_on, args=(folder, heartbeat), name=f"run-{run.id}", daemon=True))
        with self._workers_changed:
            self._workers[run.id] = worker
        worker.thread.start()

    def wait_for_workers(self):
        with self._workers_changed:
            if self._workers:
                log.info("waiting for %d run(s) to finish", len(self._workers))
            while self._workers:
                self._workers_changed.wait(timeout=1)

    # --- one run, in its worker thread ----------------------------------------

    def work_on(self, folder, heartbeat):
        run = folder.claim
        heartbeat.start()
        try:
            if "outcome" not in folder.state:
                self.execute(folder, heartbeat)
            self.hold_for_review(folder)
            self.report(folder)
            self.clean_up(folder)
        except RunParked as waiting:
            log.info("run %s: %s; it holds no worker slot meanwhile", run.id, waiting)
        except (RunTakenBack, LeaseLost) as error:
            log.info("run %s: %s; its container and files are removed, nothing is reported", run.id, error)
            self.record("taken_back", run.id, reason=str(error))
            self.clean_up(folder)
        except Unreachable as error:
            log.warning("run %s: %s; its files stay in %s and are reported once it answers",
                        run.id, error, folder.path)
        except RegistryRefused as error:  # a 404 to its input, say: fail the run, if the registry still listens
            log.warning("run %s: the registry refused a request (%s)", run.id, error)
            self.give_up(folder, f"the registry refused a request for this run: {error}")
        except Exception as error:  # a bug or a broken machine: report it rather than retry forever
            log.exception("run %s: the site runner failed", run.id)
            self.give_up(folder, f"the site runner failed: {type(error).__name__}: {error}")
        finally:
            heartbeat.stop()
            self.close_gateway(run.id)
            with self._workers_changed:
                del self._workers[run.id]
                self._workers_changed.notify_all()

    def execute(self, folder, heartbeat):
        run = folder.claim
        if "image" not in folder.state:
            try:
                pinned = self.images.fetch(image_policy.parse_image_reference(run.image))
            except ImageUnavailable as error:
                folder.record(outcome={"exit_code": None, "failure_reason": str(error)})
                return
            heartbeat.check()  # a long pull gives the researcher time to cancel
            folder.record(image=pinned.run_reference, digest=pinned.digest,
                          image_details=pinned.details)
            self.record("image_pulled", run.id, reference=run.image, digest=pinned.digest)
        if "container_id" not in folder.state and "input_sha256" not in folder.state:
            try:
                self.take_input(folder)
            except InputTooLarge as error:
                folder.record(outcome={"exit_code": None, "failure_reason": str(error)})
                return
            folder.record(input_sha256=sha256_of(folder.input_file))
        if not folder.state.get("start_reported"):
            if not self.wait_for_approval(folder):
                return
            if not run.started:
                self.report_started(folder)
            folder.record(start_reported=True)
        container = None  # one created before the runner restarted is looked for by run_container
        if "container_id" not in folder.state:
            try:
                mounts = folder.prepare_mounts(self.mount_disks(folder))
            except disk_limits.DiskProblem as error:
                folder.record(outcome={"exit_code": None, "failure_reason": f"the site could not prepare the run's "
                                       f"disk: {error}"})
                return
            network_mode = self.network_for(folder)
            if network_mode is None:
                return
            container = containers.create_contained(
                self.engine, folder.state["image"], mounts, container_environment(self.config, run),
                self.config.container, containers.labels_for(self.config.site_name, self.config.work_dir,
                                                             run.task_id, run.id),
                network_mode)
            folder.record(container_id=container.id)
            log.info("run %s: container %s of %s", run.id, container.short_id, folder.state["image"])
        self.run_container(folder, heartbeat, container)

    def take_input(self, folder):
        """Write the task's input to the run's input file: the claim's, or (when the claim did not carry it, or
        the runner restarted since) downloaded. Raises InputTooLarge past the site's max_input_bytes."""
        run, limit = folder.claim, self.config.max_input_bytes
        if run.input is None:
            self.registry.download_input(run.id, folder.input_file, limit)
            return
        if len(run.input) > limit:
            raise InputTooLarge(limit)
        folder.input_file.parent.mkdir(parents=True, exist_ok=True)
        folder.input_file.write_bytes(run.input)

    def mount_disks(self, folder):
        """Mount the run's and its session's filesystems (again, after a reboot), or make their folders when the
        site polls; returns the session's /temp. Raises disk_limits.DiskProblem."""
        if folder.older_layout:
            pass  # its container binds the folders it was created with
        elif self.output_disk:
            disk_limits.mount(folder.disk_image, folder.disk, self.output_disk)
        else:
            folder.disk.mkdir(exist_ok=True)
        return self.sessions.temp_for(folder.claim.session_id)

    def network_for(self, folder):
        """The algorithm container's network: the site's choice, or by default its relay's namespace, where
        127.0.0.1 leads to the gateway and nowhere else. None if the relay could not be started (the run failed)."""
        if not uses_gateway(self.config):
            return self.config.container.network
        relay_id = folder.state.get("relay_container_id")
        if relay_id is None:
            # Taken before the gateway's socket is in the folder: the kept relay's folder becomes the run's.
            relay_id = self.relays.take(folder.claim.session_id, folder.gateway_dir)  # a listening one, or None
            if relay_id:
                folder.record(relay_container_id=relay_id, relay_ready=True)
        elif not (containers.is_running(self.engine, relay_id) and folder.gateway_dir.is_dir()):
            # The runner restarted, and the relay (or the socket folder bound into it) went meanwhile.
            containers.remove(self.engine, relay_id)
            relay_id = None
        self.open_gateway(folder)
        if relay_id is None:
            relay = containers.create_relay(self.engine, self._relay_image, folder.gateway_dir,
                                            containers.labels_for(self.config.site_name, self.config.work_dir,
                                                                  folder.claim.task_id, folder.run_id))
            relay_id = relay.id
            folder.record(relay_container_id=relay_id, relay_ready=False)
            containers.start(relay)
        if not folder.state.get("relay_ready"):  # and after a restart, if it was not seen listening before
            try:
                containers.wait_until_listening(self.engine.containers.get(relay_id))
            except (containers.RelayFailed, docker.errors.NotFound) as error:
                containers.remove(self.engine, relay_id)
                del folder.state["relay_container_id"]  # so that no later run is given it
                folder.record(outcome={"exit_code": None, "failure_reason": str(error)})
                return None
            folder.record(relay_ready=True)
        return f"container:{folder.state['relay_container_id']}"

    def open_gateway(self, folder):
        """Serve the run's gateway (again, after a restart) unless it is open already."""
        run = folder.claim
        with self._gateways_lock:
            if run.id in self._gateways:
                return
            query_log = QueryLog(query_log_path(self.config.work_dir, run.id), run.id, run.task_id,
                                 self.config.sparql_gateway.record_query_text)
            gateway = self.new_gateway(run.id, run.task_id, folder.gateway_dir, query_log)
            gateway.open()
            self._gateways[run.id] = gateway

    def new_gateway(self, run_id, task_id, socket_dir, query_log):
        """A gateway as every run gets it: this site's endpoint and limits, its socket the relay user's, its
        queries read by the parser pool."""
        return RunGateway(run_id, task_id, socket_dir, self.upstream, self.config.sparql_gateway, query_log,
                          socket_owner=containers.RELAY_UID, parse=self.parser.judge)

    def close_gateway(self, run_id):
        with self._gateways_lock:
            gateway = self._gateways.pop(run_id, None)
        if gateway:
            gateway.close()

    def wait_for_approval(self, folder, now=None):
        """True if the site's approval policy lets the run's image digest (or task) run; else park the run at the
        registry, awaiting approval, and raise RunParked. False (and the run failed) if the registry started the run
        with its claim although the policy makes it wait: it may have been asked when the policy was another, or not
        asked at all, and either way no approval is skipped."""
        run, digest = folder.claim, folder.state["digest"]
        waiting, approval = self.approval_wait(folder, now)
        self.record("policy", run.id, policy=self.config.approval_policy, digest=digest,
                    input_sha256=folder.state.get("input_sha256"), decision="waits" if waiting else "goes ahead",
                    approval=approval.describe() if approval else None)
        if waiting is None:
            return True
        if run.started:
            folder.record(outcome={"exit_code": None, "failure_reason": (
                f"the registry started the run with its claim, but this site's approval policy "
                f"({self.config.approval_policy}) makes it wait for the IT officer ({waiting.reason}); it did not run: "
                "post it again")})
            return False
        self.let_go_while_waiting(folder)  # its filesystem, mounted with its folder (SpareRunFolder)
        self.registry.park(run.id, run.lease_id, lifecycle.AWAITING_APPROVAL, waiting.reason, digest)
        folder.record(parked=lifecycle.AWAITING_APPROVAL, parked_at=time.time(), waits_for=waiting.reason)
        raise RunParked(waiting.reason)

    def approval_wait(self, folder, now=None):
        """approvals.needs_approval for this run, under the site's policy as configured now."""
        digest = folder.state["digest"]
        return approvals.needs_approval(self.config.approval_policy, digest, folder.claim.researcher, folder.claim_key,
                                        folder.state.get("input_sha256"), self.approvals.approvals_of(digest),
                                        time.time() if now is None else now)

    def report_started(self, folder):
        run = folder.claim
        try:
            self.registry.report_started(run.id, run.lease_id, folder.state["digest"])
        except LeaseLost:
            # A runner killed right after reporting cannot have recorded that it did.
            if self.registry.run_status(run.id, run.lease_id) != lifecycle.RUNNING:
                raise

    def container_left_behind(self, folder):
        """The run's container as a restarted runner finds it, its gateway open again if it is still to run; None
        (and the run failed) if it, or the relay it needs, went while the runner was not running."""
        container = containers.find(self.engine, folder.state["container_id"])
        if container is None:
            folder.record(outcome={"exit_code": None,
                                   "failure_reason": "its container was removed while the runner was not running"})
            return None
        if uses_gateway(self.config) and containers.has_not_ended(container):
            # An algorithm that already ended needs no gateway: only one still to run or running does.
            if not containers.is_running(self.engine, folder.state.get("relay_container_id")):
                containers.remove(self.engine, container.id)
                folder.record(outcome={"exit_code": None, "failure_reason": "its SPARQL relay container was "
                                       "stopped or removed while the runner was not running, so it could not "
                                       "reach its data"})
                return None
            self.open_gateway(folder)
        return container

    def run_container(self, folder, heartbeat, container=None):
        """Run the run's container to its end and pack what it left; container: as created by this runner, or None
        to find it (the runner restarted since it was created). The container is removed by clean_up, after the
        report: nothing of it is needed any more, and the researcher need not wait for its removal."""
        run, limits = folder.claim, self.config.container
        found = container is None
        if found:
            container = self.container_left_behind(folder)
            if container is None:
                return
        try:
            session_temp = self.mount_disks(folder)  # after a reboot they are images only, not mounted
        except disk_limits.DiskProblem as error:
            containers.remove(self.engine, container.id)
            folder.record(outcome={"exit_code": None, "failure_reason": f"the site could not mount the run's disk "
                                   f"again: {error}"})
            return
        if "started_at" not in folder.state:
            folder.record(started_at=time.time())
        container_log = LogFollower(container, folder.log_file).start(just_created=not found)
        self.record("container_started", run.id, container=container.id, image=folder.state["image"],
                    digest=folder.state["digest"], relay=folder.state.get("relay_container_id"))
        containers.start(container)
        timeout = timeout_for(run, limits)
        output_checked = [time.monotonic()]

        def reason_to_stop():
            reason = heartbeat.stop_reason or timeout_reason(folder.state["started_at"], timeout, time.time())
            polled = not self.output_disk or folder.older_layout
            if not reason and polled and time.monotonic() - output_checked[0] > OUTPUT_CHECK_SECONDS:
                # Checked while it runs, so an algorithm cannot fill the site's disk.
                output_checked[0] = time.monotonic()
                try:
                    reason = output_archive.too_large_reason(
                        output_archive.output_size(folder.output_dir), limits.max_output_bytes)
                except output_archive.OutputUnreadable as error:
                    reason = f"the site could not measure the output: {error}"
            if reason:
                folder.record(stop_reason=reason)  # so a restarted runner knows why it was killed
            return reason

        exit_code, reason = containers.wait_for_end(container, reason_to_stop)
        sparql = self.end_gateway(folder)
        heartbeat.check()
        self.sessions.mark_used(run.session_id)
        reason = reason or folder.state.get("stop_reason")
        if reason is None and containers.was_out_of_memory(container):
            reason = f"out of memory: the algorithm needed more than this site's limit of {limits.memory}"
        if reason is None and self.output_disk:
            reason = disk_limits.full_reason(folder.disk, "the output (with /output.txt and /log.txt)",
                                             self.output_disk)
        container_log.finish()
        notes = [f"ended: {reason}"] if reason else []
        temp_full = self.sessions.temp_size and disk_limits.full_reason(session_temp, "/temp", self.sessions.temp_size)
        if temp_full:
            notes.append(temp_full)
        if sparql:
            notes.append(f"SPARQL gateway: {sparql['queries']} queries, {sparql['refused']} refused, "
                         f"{sparql['bytes']} bytes read")
        own_log = folder.read_pytaskmanager_log(MAX_OWN_LOG_BYTES)
        if own_log:
            notes.append("/log.txt follows\n" + own_log)
        if reason is None:
            reason = self.airlock_veto(folder)
            if reason:
                notes.append(reason)
                folder.record(withheld=True)
        if reason is None:
            # Files addressed to a third party leave the output before it is packed.
            reason = deliveries.set_aside(folder.output_dir, folder.outbox, self.config.recipients)
        if reason is None:
            reason, skipped = self.pack_output(folder)
            if skipped:
                notes.append(skipped_note(skipped))
            if reason:
                notes.append(reason)
        with open(folder.log_file, "a", encoding="utf-8") as log_file:
            log_file.writelines(f"\n[site runner] {note}\n" for note in notes)
        folder.record(outcome={"exit_code": exit_code, "failure_reason": reason, "sparql": sparql})
        self.record("container_ended", run.id, container=container.id, exit_code=exit_code, reason=reason,
                    sparql=sparql)
        log.info("run %s: container ended: %s", run.id, reason or f"exit code {exit_code}")

    def airlock_veto(self, folder):
        """The site's automatic checks of the output (airlock in its config), before any of it leaves: None if it
        passes (or the site checks nothing), else why not, in words that name no file (the site's log and audit
        log have the file too)."""
        checks = self.config.airlock.checks
        if checks == airlock_checks.AirlockChecks():
            return None
        run = folder.claim
        veto = airlock_checks.veto(folder.output_dir, checks, {
            "run_id": run.id, "task_id": run.task_id, "researcher": run.researcher,
            "image_digest": folder.state.get("digest")})
        if veto is None:
            return None
        log.warning("run %s: %s", run.id, veto.detail)
        self.record("vetoed", run.id, detail=veto.detail)
        return veto.reason

    def hold_for_review(self, folder):
        """With airlock review on, a run whose algorithm ran waits with its output and log at the site until the
        IT officer releases or rejects them (runScript.py outputs ...): parks it and raises RunParked."""
        state = folder.state
        if (not self.config.airlock.review or "reviewed" in state or state.get("withheld")
                or not state.get("start_reported")):
            return
        run = folder.claim
        reason = (f"held for review at {self.config.site_name}: its output and log leave once the site's IT officer "
                  "has released them")
        self.let_go_while_waiting(folder)  # what leaves is packed beside it
        self.registry.park(run.id, run.lease_id, lifecycle.HELD_FOR_REVIEW, reason)
        folder.record(parked=lifecycle.HELD_FOR_REVIEW, parked_at=time.time(), waits_for=reason)
        self.record(lifecycle.HELD_FOR_REVIEW, run.id)
        raise RunParked(reason)

    def end_gateway(self, folder):
        """Close the run's gateway; returns what the gateway saw (None without one). Its relay, which now leads
        nowhere, is removed with the run's other containers once the run is reported (clean_up)."""
        if not uses_gateway(self.config):
            return None
        run = folder.claim
        self.close_gateway(run.id)
        return summarize(read_query_log(query_log_path(self.config.work_dir, run.id)))

    def pack_output(self, folder):
        """Returns (failure reason or None, skipped paths)."""
        folder.drop_unused_pytaskmanager_output()
        try:
            return None, output_archive.pack_output(folder.output_dir, folder.archive,
                                                    self.config.container.max_output_bytes)
        except output_archive.OutputTooLarge as error:
            return str(error), []
        except output_archive.OutputUnreadable as error:
            return f"the output could not be packed: {error}", []

    def report(self, folder):
        """Send what may leave (nothing but the reason when the airlock withheld it), then how the run ended."""
        run, outcome = folder.claim, folder.state["outcome"]
        failure_reason = outcome["failure_reason"]
        if failure_reason is None:
            try:
                deliveries.deliver(folder.outbox, self.config.recipients, task_id=run.task_id,
                                   retry_for_seconds=self.registry.retry_for_seconds,
                                   record_receipt=lambda *receipt: self.delivered(run, *receipt),
                                   ca_bundle=self.config.ca_bundle)
            except deliveries.DeliveryRefused as error:
                failure_reason = str(error)
        carried = {}  # what goes within the finish report: {kind: (the file as it leaves, its original)}
        if failure_reason is None and folder.archive.exists():
            try:
                self.upload(run, "output", folder.archive, carried)
            except RegistryRefused as error:
                failure_reason = f"the registry did not accept the output: {error}"
        if folder.log_file.exists() and not folder.state.get("withheld"):
            self.upload(run, "log", folder.log_file, carried)
        self.registry.finish(run.id, run.lease_id, outcome["exit_code"], shortened(failure_reason),
                             sparql=outcome.get("sparql"),
                             carried={kind: sealed for kind, (sealed, _original) in carried.items()})
        for kind, (sealed, original) in carried.items():
            self.record_sent(run, kind, sealed, sha256_of(sealed), original)
        self.record("reported", run.id, exit_code=outcome["exit_code"], failure_reason=failure_reason)
        log.info("run %s reported: exit code %s%s", run.id, outcome["exit_code"],
                 f", failed: {failure_reason}" if failure_reason else "")

    def upload(self, run, kind, path, carried):
        """Send the output or log (kind) as it may leave: by an upload of its own now, or, when the claim said the
        finish report may carry one this small, into carried, for the finish report."""
        sealed = self.sealed(run, path)
        if sealed.stat().st_size <= run.inline_result_bytes:
            carried[kind] = (sealed, path)
            return
        self.record_sent(run, kind, sealed, self.registry.upload(run.id, run.lease_id, kind, sealed), path)

    def record_sent(self, run, kind, sealed, sha256, original):
        self.record("sent", run.id, what=kind, sha256=sha256, size=sealed.stat().st_size,
                    to=self.config.registry_url, encrypted=sealed != original)

    def delivered(self, run, recipient, name, size, sha256):
        self.registry.record_delivery(run.id, run.lease_id, recipient, name, size, sha256)
        self.record("sent", run.id, what="delivery", name=name, sha256=sha256, size=size, to=recipient,
                    url=self.config.recipients[recipient].url)

    def sealed(self, run, path):
        """The file as it may leave the site: for an encrypted task, encrypted to the researcher's keys
        (as this site pinned them, if it pins keys: a run whose keys it refused never got this far)."""
        keys, _refused = keys_for(run, self.config.researcher_keys)
        return encrypt_once(path, path.with_name(path.name + ".age"), keys) if keys else path

    def give_up(self, folder, reason):
        run = folder.claim
        try:
            self.registry.finish(run.id, run.lease_id, None, shortened(reason))
        except (LeaseLost, RegistryRefused, Unreachable) as error:
            log.warning("run %s: could not report the failure either (%s)", run.id, error)
        self.clean_up(folder)

    def free_slot_of(self, run_id):
        """See Worker.slot_freed; nothing for a run no worker carries (a parked one the main loop ends)."""
        with self._workers_changed:
            worker = self._workers.get(run_id)
            if worker is not None and not worker.slot_freed:
                worker.slot_freed = True
                self._workers_changed.notify_all()

    def let_go_while_waiting(self, folder):
        """A run that waits for a person (approval, review) holds no container, relay, gateway or mount meanwhile,
        however long that takes (its relay is not kept either): made again if it goes on."""
        self.remove_containers(folder, keep_relay=False)
        try:
            disk_limits.release(folder.disk)
        except disk_limits.DiskProblem as error:
            log.warning("run %s: its filesystem stays mounted while it waits (%s)", folder.run_id, error)

    def remove_containers(self, folder, keep_relay=True):
        """Remove the run's container and close its gateway; its relay is kept for the session's next run (if
        keep_relay), or removed. Each is forgotten once it is gone: a removal that failed is tried again by the next
        clean-up (give_up's), and what a runner killed meanwhile leaves is found by its id or removed at the start."""
        self.close_gateway(folder.run_id)
        if "container_id" in folder.state:
            containers.remove(self.engine, folder.state["container_id"])
            del folder.state["container_id"]
            folder.save()
        relay_id = folder.state.get("relay_container_id")
        if relay_id:
            # Kept for the session's next run only now that nothing of this run is left in its namespace, only if it
            # was seen listening, and only while the session's /temp is here (a kept relay goes with it).
            if keep_relay and folder.state.get("relay_ready") and self.sessions.holds(folder.claim.session_id):
                self.relays.keep(folder.claim.session_id, relay_id, folder.gateway_dir)
            else:
                containers.remove(self.engine, relay_id)
            for key in ("relay_container_id", "relay_ready"):
                folder.state.pop(key, None)
            folder.save()

    def clean_up(self, folder):
        with self.relays.returning(folder.claim.session_id):
            if "outcome" in folder.state:
                # Its container has ended: the next claim need not wait for its removal, and a next run of the
                # session waits for the relay (RelayPool.returning).
                self.free_slot_of(folder.run_id)
            self.remove_containers(folder)
        self.free_slot_of(folder.run_id)
        try:
            folder.remove()
        except disk_limits.DiskProblem as error:
            log.warning("run %s: its filesystem could not be unmounted (%s); its folder is removed at the next start",
                        folder.run_id, error)
        self.make_spare_folder()  # for the next run; this worker holds no slot any more (free_slot_of)


@dataclass
class Worker:
    session_id: int
    thread: threading.Thread
    heartbeat: "Heartbeat"
    # Its run is over, its container ended (or removed): what is left to do (the container's removal, the folder's)
    # holds no slot, so the next claim need not wait for it. The worker is still known by its run id, so a claim of
    # the same run waits for it (take_on).
    slot_freed: bool = False


class Heartbeat:
    """Extends the run's lease in the background and notices a cancel or a lost lease."""

    def __init__(self, registry, run_id, lease_id, lease_seconds):
        self.registry, self.run_id, self.lease_id = registry, run_id, lease_id
        self.interval = max(1.0, lease_seconds / 3)
        self.stop_reason = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()

    def check(self):
        if self.stop_reason:
            raise RunTakenBack(self.stop_reason)

    def stop_work(self, reason):
        self.stop_reason = reason

    def _beat(self):
        wait, outage = self.interval, Outage()
        while not self._done.wait(wait):
            try:
                status = self.registry.heartbeat(self.run_id, self.lease_id)
            except LeaseLost as error:
                self.stop_reason = f"the registry took the run back ({error})"
                return
            except (*TRANSIENT_ERRORS, RegistryRefused) as error:
                said = outage.failed(registry_problem(error, self.registry.url), time.monotonic())
                if said:
                    log.warning("heartbeat for run %s failed: %s; trying every %d s", self.run_id, said,
                                HEARTBEAT_RETRY_SECONDS)
                # Soon: once the registry is back, the lease must be renewed before it runs out.
                wait = HEARTBEAT_RETRY_SECONDS
                continue
            if outage.answered():
                log.info("heartbeat for run %s: the registry answers again", self.run_id)
            if status == lifecycle.CANCELLED:
                self.stop_reason = "cancelled by the researcher"
                return
            wait = self.interval


# --- pure decisions -------------------------------------------------------------

def registry_problem(error, url):
    """A request to the registry at url that failed, in one line for the log: its refusal, or what kept it from
    answering."""
    url = escaped(url)
    if isinstance(error, requests.exceptions.SSLError):
        return (f"registry at {url}: its TLS certificate is not verified (replaced, expired, or signed by a CA not "
                "in ca_bundle)")
    if isinstance(error, Unreachable):
        return str(error)  # what was tried, for how long, and why it failed
    if isinstance(error, RegistryRefused):
        return f"registry at {url}: {error}"
    return request_problem(error, "registry", url)


def claim_wait_seconds(long_poll_seconds, online, once, person_awaited_seconds=None):
    """How long a claim may wait for work at the registry: not at all until a claim came back since the start or
    the registry's last problem, so that the log says at once that the runner is online (an idle long-poll would
    keep it quiet for long_poll_seconds); but --once polls once, as long as it may. While a run waits for a person
    at the site (person_awaited_seconds: the poll interval), at most that, in whole seconds as the registry takes
    them: the runner acts on their decision between claims."""
    wait = long_poll_seconds if online or once else 0
    return wait if person_awaited_seconds is None else min(wait, math.ceil(person_awaited_seconds))


def certificate_refused(config):
    """The runner's first request found a registry that did not prove who it is."""
    return (f"the registry {config.registry_url} did not prove who it is: its TLS certificate is not verified "
            f"against {config.ca_bundle or 'the system CAs'}; if a private CA signs it, set ca_bundle to that CA's "
            "PEM file")


def token_refused(config, error):
    return (f"the registry {config.registry_url} refused this site's token ({error}): it is wrong or was revoked; "
            f"ask the registry's operator for site {config.site_name}'s token and set site_token (or site_token_env)")


def startup_summary(config):
    """What this site allows, in a few lines for the runner's start-up log (pure). Strings from the config are
    escaped, and lists shown as JSON as config.json writes them, so that no value can forge a line of the log."""
    limits, airlock = config.container, config.airlock
    digest = ("true: only images pinned by digest (@sha256:...) run" if config.require_digest
              else "false: tags run too, pulled and then run by the digest pulled")
    return [
        f"site {escaped(config.site_name)}: runner started ({RUNNER_VERSION}), registry "
        f"{escaped(config.registry_url)}, long-poll {config.long_poll_seconds} s",
        f"whitelist {json.dumps([pattern.pattern for pattern in config.whitelist])}: an image runs only if a pattern "
        f"matches its whole reference; require_digest {digest}",
        network_summary(config),
        f"approval_policy {escaped(config.approval_policy)}: {APPROVAL_POLICY_MEANINGS[config.approval_policy]}; "
        "airlock: " + ("results wait at the site until the IT officer releases them (runScript.py outputs)"
                       if airlock.review else "results leave when the run ends") + f", {airlock_summary(airlock)}",
        recipients_summary(config.recipients),
        researcher_keys_summary(config.researcher_keys),
        f"up to {config.max_concurrent_runs} run(s) at once; each algorithm gets {escaped(limits.memory)} of memory, "
        f"{limits.cpus:g} CPU(s), {limits.pids} processes and {limits.timeout_seconds} s, /output "
        f"{size_in_words(limits.max_output_bytes)} in {limits.max_output_files} files, /temp "
        f"{size_in_words(limits.max_temp_bytes)} in {limits.max_temp_files} files per session (disk_limits "
        f"{escaped(limits.disk_limits)}); task inputs up to {size_in_words(config.max_input_bytes)}",
    ]


def network_summary(config):
    endpoint = escaped(config.sparql_endpoint)
    network = config.container.network
    if uses_gateway(config):
        return (f"container.network none: algorithms have no network; they reach {endpoint} only through each "
                "run's read-only SPARQL gateway")
    if network == "host":
        return f"container.network host: algorithms reach whatever this machine reaches, and query {endpoint} directly"
    return (f"container.network {escaped(network)}, a Docker network: algorithms reach whatever it reaches, and query "
            f"{endpoint} directly")


def airlock_summary(airlock):
    checks = airlock.checks
    parts = []
    if checks.max_file_bytes is not None:
        parts.append(f"each file at most {size_in_words(checks.max_file_bytes)}")
    if checks.allowed_suffixes is not None:
        parts.append(f"file names ending in {json.dumps(list(checks.allowed_suffixes))}")
    if checks.check_command is not None:
        parts.append(f"check command {json.dumps(list(checks.check_command))} (at most "
                     f"{checks.check_timeout_seconds} s)")
    return "checked: " + ", ".join(parts) if parts else "no automatic checks"


def recipients_summary(recipients):
    if not recipients:
        return "recipients: none (a run whose algorithm addresses files to a third party fails)"
    named = ", ".join(f"{escaped(name)} at {escaped(recipient.url)}" for name, recipient in recipients.items())
    return f"recipients (files sent straight there, encrypted to the key pinned for each): {named}"


def researcher_keys_summary(researcher_keys):
    if researcher_keys is None:
        return "researcher_keys not pinned: encrypted results are encrypted to the keys the registry sends"
    named = ", ".join(f"{escaped(name)} ({len(keys)} key{'s' if len(keys) > 1 else ''})"
                      for name, keys in list(researcher_keys.items())[:MAX_NAMES_SHOWN])
    more = f" and {len(researcher_keys) - MAX_NAMES_SHOWN} more" if len(researcher_keys) > MAX_NAMES_SHOWN else ""
    return (f"researcher_keys pinned for {len(researcher_keys)} researcher(s){': ' if named else ''}{named}{more}; a "
            "task asking for any other key is refused")


def startup_warnings(config):
    """What the site risks by its config, for the runner's start-up log (pure): plain HTTP beyond this machine,
    algorithms on a network, whitelist patterns that admit more than they seem to."""
    endpoint = escaped(config.sparql_endpoint)
    urls = (config.registry_url, *(recipient.url for recipient in config.recipients.values()))
    warnings = [escaped(warning) for warning in map(plain_http_warning, urls) if warning]
    network = config.container.network
    if network == "host":
        warnings.append("container.network is host (allow_host_network): algorithms can reach everything this "
                        f"machine can, and query {endpoint} directly, not through the SPARQL gateway")
    elif not uses_gateway(config):
        warnings.append(f"container.network is the Docker network {escaped(network)}: algorithms reach whatever it "
                        f"reaches, and query {endpoint} directly, not through the SPARQL gateway")
    return warnings + whitelist_warnings(config.whitelist)


def whitelist_warnings(whitelist):
    """One line per whitelist pattern that admits more than it seems to (image_policy.overbroad_patterns)."""
    warnings = []
    for index, pattern in enumerate(whitelist):
        try:
            warnings += [f"whitelist[{index}] {json.dumps(pattern.pattern)} {why}"
                         for _, why in image_policy.overbroad_patterns([pattern])]
        except Exception as error:  # a check that only warns must never stop the runner
            warnings.append(f"whitelist[{index}] {json.dumps(pattern.pattern)} could not be checked for being too "
                            f"broad ({type(error).__name__}); read docs/site-config.md on tight patterns")
    return warnings


def size_in_words(size):
    """1073741824 -> '1 GiB'; a size that is no whole number of KiB stays in bytes."""
    for unit, name in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def uses_gateway(config):
    """With network none (the default) algorithms reach the data through the gateway; with a network the site
    allowed, they query the endpoint directly."""
    return config.container.network == "none"


def container_environment(config, run):
    sparql_endpoint = ENDPOINT_IN_CONTAINER if uses_gateway(config) else config.sparql_endpoint
    return {
        "SPARQL_ENDPOINT": sparql_endpoint,
        "TASK_ID": str(run.task_id),
        "SESSION_ID": str(run.session_id),
        "SITE_NAME": config.site_name,
        # The original PyTaskManager's names, so images written for it run unchanged.
        "RUN_ID": str(run.session_id),
        "endpointUrl": sparql_endpoint,
        "endpointType": config.endpoint_type,
        "endpointToken": config.endpoint_token,
    }


def timeout_for(run, limits):
    """A task may ask for less time than the site allows, never more."""
    return min(run.timeout_seconds or limits.timeout_seconds, limits.timeout_seconds)


def timeout_reason(started_at, timeout_seconds, now):
    if now - started_at > timeout_seconds:
        return f"timeout: still running after {timeout_seconds} s"
    return None


def progress_of(state):
    """A run's progress in words, for the log."""
    if "outcome" in state:
        return "ended, not yet reported"
    if "container_id" in state:
        return "its container was created"
    if "image" in state:
        return "image fetched"
    return lifecycle.CLAIMED


SKIPPED_NAMED = 20  # of the links and special files left out of an upload, named in the run's log


def skipped_note(skipped):
    """The run log's line about what was left out of the upload: names from the algorithm, printable (a
    newline in one cannot forge a line of the log), the first few of them, and how many in all."""
    named = ", ".join(output_archive.shown_path(path) for path in skipped[:SKIPPED_NAMED])
    more = f" and {len(skipped) - SKIPPED_NAMED} more" if len(skipped) > SKIPPED_NAMED else ""
    return f"not uploaded (links or special files): {named}{more}"


def shortened(reason):
    if reason is None or len(reason) <= MAX_REASON_CHARS:
        return reason
    return reason[:MAX_REASON_CHARS - 1] + "…"
