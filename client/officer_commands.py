"""The site IT officer's commands, next to the runner they already run:

    python client/runScript.py approvals list                 runs waiting for approval
    python client/runScript.py approvals show RUN             its image (digest, labels, size, date, earlier
                                                              approvals), its task's input, its researcher
    python client/runScript.py approvals approve RUN [--researcher NAME] [--days N] [--only-this-task]
    python client/runScript.py approvals approve --digest DIGEST [--researcher NAME] [--days N]
    python client/runScript.py approvals deny RUN --reason TEXT
    python client/runScript.py outputs list|show RUN|release RUN|reject RUN --reason TEXT
    python client/runScript.py audit verify
    python client/runScript.py audit show [--run RUN]

Each decision is stored at the site (approvals.py) and written to its audit log, with who made it
(--by, else the login that ran the command); the running runner acts on it within a poll interval.
Everything shown here came from a researcher, a registry or an algorithm: it is printed printable
only, cut short, so nothing in it can rewrite the officer's terminal.
"""

import getpass
import io
import os
import tarfile
import time

from client import approvals, image_policy
from client.audit_log import AuditLog, AuditLogBroken, describe, entries_of_run, read_entries, verify
from common.printable import printable
from client.run_folder import parked_run, parked_runs
from master import lifecycle

SHOWN_INPUT_BYTES = 4096
SHOWN_FILE_BYTES = 4096
SECONDS_PER_DAY = 24 * 3600


class CommandFailed(Exception):
    """One line for the officer, naming the fix."""


class Officer:
    """The commands, over one site's work folder and config."""

    def __init__(self, config, by=None, out=print, now=time.time):
        self.config = config
        self.by = by or os.environ.get("SUDO_USER") or getpass.getuser()
        self.out = out
        self.now = now
        self.store = approvals.ApprovalStore(config.work_dir / "approvals.sqlite")
        self.audit = AuditLog(config.work_dir / "audit.jsonl")
        self.runs_dir = config.work_dir / "runs"

    # --- approvals -------------------------------------------------------------------------------------

    def list_waiting(self, status):
        waiting = parked_runs(self.runs_dir, status)
        if not waiting:
            self.out(f"nothing is {status.replace('_', ' ')} at this site")
        for folder in waiting:
            run = folder.claim
            self.out(printable(f"run {run.id}  task {run.task_id}  researcher {run.researcher}  since "
                               f"{approvals.utc(folder.state.get('parked_at', 0))}  image {run.image}  "
                               f"digest {folder.state.get('digest')}"))

    def show_approval(self, run_id):
        folder = self._parked_run(run_id, lifecycle.AWAITING_APPROVAL)
        run, state = folder.claim, folder.state
        details = state.get("image_details") or {}
        self.out(printable(f"run {run.id} of task {run.task_id} (session {run.session_id}), by researcher "
                           f"{run.researcher}"))
        self.out(printable(f"waits: {state.get('waits_for')}"))
        self.out(printable(f"image: {run.image}"))
        self.out(printable(f"digest: {state.get('digest')}  (image id {details.get('id')})"))
        self.out(printable(f"size: {details.get('size')} bytes, created {details.get('created')}"))
        for name, value in sorted((details.get("labels") or {}).items()):
            self.out(printable(f"label {name}: {value}"[:300]))
        history = self.store.approvals_of(state.get("digest"))
        self.out(f"earlier approvals of this digest: {len(history)}")
        for approval in history:
            self.out(printable("  " + approval.describe()))
        with open(folder.input_file, "rb") as input_file:
            shown = input_file.read(SHOWN_INPUT_BYTES + 1)
        cut = f" (first {SHOWN_INPUT_BYTES} bytes)" if len(shown) > SHOWN_INPUT_BYTES else ""
        self.out(f"input, sha256 {state.get('input_sha256')}{cut}:")
        self.out(printable_lines(shown[:SHOWN_INPUT_BYTES]))

    def approve(self, run_id=None, digest=None, researcher=None, days=None, only_this_task=False, note=None):
        """Approve the run's image digest (or a digest given), or, under approve_every_task or with
        only_this_task, the run's task alone. With both a run and a digest, the run must wait for that digest."""
        expires_at = None if days is None else self.now() + days * SECONDS_PER_DAY
        task_only = only_this_task or self.config.approval_policy == approvals.APPROVE_EVERY_TASK
        if run_id is None:
            if not image_policy.DIGEST.fullmatch(digest or ""):
                raise CommandFailed("give the run to approve (approvals list shows them), or --digest sha256:<64 hex>")
            if task_only:
                raise CommandFailed("this site approves every task: approve a waiting run by its number")
            approval = self.store.approve(digest, self.by, researcher, expires_at=expires_at, note=note,
                                          now=self.now())
        else:
            folder = self._parked_run(run_id, lifecycle.AWAITING_APPROVAL)
            waits_for, run = folder.state["digest"], folder.claim
            if digest and digest != waits_for:
                raise CommandFailed(f"run {run_id} waits for image {waits_for} now, not {digest}; look again "
                                    f"(approvals show {run_id})")
            approval = self.store.approve(waits_for, self.by, researcher, run_id=run.id if task_only else None,
                                          claim_key=folder.claim_key if task_only else None,
                                          input_sha256=folder.state.get("input_sha256") if task_only else None,
                                          expires_at=expires_at, note=note, now=self.now())
        self._record("approved", run_id, digest=approval.digest, researcher=approval.researcher,
                     only_run=approval.run_id, input_sha256=approval.input_sha256, expires_at=approval.expires_at,
                     by=approval.approved_by, note=note)
        what = f"task of run {approval.run_id} only" if approval.run_id else "every run of image " + approval.digest
        self.out(printable(f"approved {what}: {approval.describe()}; the runner goes on within "
                           f"{self.config.poll_interval_seconds:g} s"))

    def deny(self, run_id, reason):
        folder = self._parked_run(run_id, lifecycle.AWAITING_APPROVAL)
        denial = self.store.deny(run_id, folder.claim_key, reason, self.by, now=self.now())
        self._record("denied", run_id, reason=denial.reason, by=denial.denied_by)
        self.out(printable(f"run {run_id} denied: {denial.reason}; the researcher sees that reason"))

    # --- the airlock ------------------------------------------------------------------------------------

    def show_output(self, run_id):
        folder = self._parked_run(run_id, lifecycle.HELD_FOR_REVIEW)
        run = folder.claim
        self.out(printable(f"run {run.id} of task {run.task_id}, by researcher {run.researcher}, image "
                           f"{folder.state.get('digest')}; exit code {folder.state['outcome'].get('exit_code')}"))
        if folder.archive.exists():
            with tarfile.open(folder.archive, "r:gz") as archive:
                members = [member for member in archive if member.isfile()]
                self.out(f"output: {len(members)} file(s), {folder.archive.stat().st_size} bytes packed")
                for member in members:
                    self.out(printable(f"{member.size:>12}  {member.name}"))
                for member in members:
                    head = archive.extractfile(member).read(SHOWN_FILE_BYTES + 1)
                    if is_text(head):
                        self.out(printable(f"--- {member.name}") + (f" (first {SHOWN_FILE_BYTES} bytes)"
                                                                     if len(head) > SHOWN_FILE_BYTES else ""))
                        self.out(printable_lines(head[:SHOWN_FILE_BYTES]))
        else:
            self.out("output: none")
        for path in sorted(folder.outbox.glob("*/*.age")) if folder.outbox.is_dir() else []:
            self.out(printable(f"to {path.parent.name}: {path.name}, {path.stat().st_size} bytes (encrypted to it; "
                               "checked by the airlock before it was encrypted)"))
        if folder.log_file.exists():
            with open(folder.log_file, "rb") as log_file:
                log_file.seek(max(0, folder.log_file.stat().st_size - SHOWN_FILE_BYTES))
                self.out(f"--- log ({folder.log_file.stat().st_size} bytes), its end:")
                self.out(printable_lines(log_file.read()))

    def review(self, run_id, released, reason=None):
        folder = self._parked_run(run_id, lifecycle.HELD_FOR_REVIEW)
        review = self.store.review(run_id, folder.claim_key, released, self.by, reason, now=self.now())
        self._record("released" if review.released else "rejected", run_id, reason=review.reason,
                     by=review.reviewed_by)
        if review.released:
            self.out(f"run {run_id} released: its output and log leave within {self.config.poll_interval_seconds:g} s")
        else:
            self.out(printable(f"run {run_id} rejected: nothing of it leaves; the researcher sees: {review.reason}"))

    # --- the audit log -----------------------------------------------------------------------------------

    def verify_audit(self):
        verdict = verify(self.audit.path)
        if not verdict.ok:
            raise CommandFailed(f"audit log {self.audit.path}: BROKEN after {verdict.entries} good entries: "
                                f"{verdict.problem}")
        self.out(f"audit log {self.audit.path}: {verdict.entries} entries, the chain is intact")

    def show_audit(self, run_id=None):
        """One run's story, or the whole log; whether to trust it is `audit verify`'s to say."""
        try:
            entries = entries_of_run(self.audit.path, run_id) if run_id is not None else read_entries(self.audit.path)
            shown = 0
            for entry in entries:
                self.out(describe(entry))
                shown += 1
        except AuditLogBroken as error:
            raise CommandFailed(f"{error}") from None
        if not shown:
            self.out(f"no audit entries{'' if run_id is None else f' for run {run_id}'} at this site")

    # ---------------------------------------------------------------------------------------------------

    def _parked_run(self, run_id, status):
        folder = parked_run(self.runs_dir, run_id)
        if folder is None or folder.state["parked"] != status:
            listing = "approvals list" if status == lifecycle.AWAITING_APPROVAL else "outputs list"
            raise CommandFailed(f"run {run_id} is not {status.replace('_', ' ')} at this site; `{listing}` shows "
                                "those that are")
        return folder

    def _record(self, event, run_id, **fields):
        try:
            self.audit.append(event, run=run_id, **fields)
        except AuditLogBroken as error:
            raise CommandFailed(f"the decision is stored, but not in the audit log: {error}") from None


def is_text(data):
    """Whether a file's first bytes look like text a terminal can show (UTF-8, no NULs)."""
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(data) - 3  # a character cut at the end of what was read
    return True


def printable_lines(data):
    """Bytes from outside as lines a terminal shows as they are: printable, with their line breaks kept."""
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
    return "\n".join(printable(line) for line in text.split("\n"))
