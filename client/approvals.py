"""What the site's IT officer decided, kept at the site (never at the registry), and the decision whether a
run may go ahead under the site's approval policy.

    work_dir/approvals.sqlite   approvals (of an image digest, or of one run), denials (of one run), and
                                reviews of a run's held output (released, or rejected)

The runner reads it before each run and the officer's commands (runScript.py approvals ...) write it, from
another process: SQLite keeps the two apart. Nothing is ever deleted: an approval that no longer holds has
expired, and the history of a digest's approvals is what `approvals show` prints. needs_approval() is pure.

A decision about one run (a task's approval, a denial, a review) is bound to the site's own key for the claim
it was made on (run_folder.RunFolder.claim_key), never to the run id alone: a registry that hands out the same
run id again, with another image, input or session, gets none of the decisions made on the first.
"""

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

# The site's choice (site config approval_policy).
WHITELIST = "whitelist"  # what the whitelist allows runs at once (the original behaviour)
APPROVE_NEW_DIGESTS = "approve_new_digests"  # an image digest runs once the IT officer approved it
APPROVE_EVERY_TASK = "approve_every_task"  # every run waits for the IT officer
POLICIES = (WHITELIST, APPROVE_NEW_DIGESTS, APPROVE_EVERY_TASK)

SCHEMA = """
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL,
    researcher TEXT,        -- only this researcher's runs of the digest; NULL: anyone's
    run_id INTEGER,         -- only this run, as claimed (claim_key); NULL: every run of the digest
    claim_key TEXT,
    input_sha256 TEXT,
    expires_at REAL,        -- NULL: does not expire
    approved_by TEXT NOT NULL,
    approved_at REAL NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS approvals_by_digest ON approvals (digest);
CREATE TABLE IF NOT EXISTS reviews (
    claim_key TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    released INTEGER NOT NULL,  -- 1: its output may leave; 0: rejected, for reason
    reason TEXT,
    reviewed_by TEXT NOT NULL,
    reviewed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS denials (
    claim_key TEXT PRIMARY KEY,
    run_id INTEGER NOT NULL,
    reason TEXT NOT NULL,
    denied_by TEXT NOT NULL,
    denied_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Approval:
    id: int
    digest: str
    researcher: str | None
    run_id: int | None
    claim_key: str | None
    input_sha256: str | None
    expires_at: float | None
    approved_by: str
    approved_at: float
    note: str | None

    def holds_for(self, digest, researcher, now):
        return (self.digest == digest and self.researcher in (None, researcher)
                and (self.expires_at is None or now < self.expires_at))

    def describe(self):
        scope = f"run {self.run_id} only" if self.run_id is not None else "every run"
        who = f" of researcher {self.researcher}" if self.researcher else ""
        until = "" if self.expires_at is None else f", until {utc(self.expires_at)}"
        note = f" ({self.note})" if self.note else ""
        return f"#{self.id} {utc(self.approved_at)} by {self.approved_by}: {scope}{who}{until}{note}"


@dataclass(frozen=True)
class Denial:
    run_id: int
    reason: str
    denied_by: str
    denied_at: float


@dataclass(frozen=True)
class Review:
    run_id: int
    released: bool
    reason: str | None
    reviewed_by: str
    reviewed_at: float


class ApprovalStore:
    def __init__(self, path):
        self.path = Path(path)

    def _connect(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(SCHEMA)
        self.path.chmod(0o600)  # it says who approved what: the site's business only
        return connection

    def approve(self, digest, approved_by, researcher=None, run_id=None, claim_key=None, input_sha256=None,
                expires_at=None, note=None, now=None):
        """Record an approval of the digest, or (run_id and claim_key given) of that claim of one run; returns it."""
        now = time.time() if now is None else now
        with self._connect() as connection:
            approval_id = connection.execute(
                "INSERT INTO approvals (digest, researcher, run_id, claim_key, input_sha256, expires_at, approved_by, "
                "approved_at, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (digest, researcher, run_id, claim_key, input_sha256, expires_at, approved_by, now, note)).lastrowid
        return Approval(approval_id, digest, researcher, run_id, claim_key, input_sha256, expires_at, approved_by,
                        now, note)

    def approvals_of(self, digest):
        """Every approval of the digest ever given, oldest first."""
        with self._connect() as connection:
            rows = connection.execute(
                "SELECT id, digest, researcher, run_id, claim_key, input_sha256, expires_at, approved_by, approved_at, "
                "note "
                "FROM approvals WHERE digest = ? ORDER BY id", (digest,)).fetchall()
        return [Approval(*row) for row in rows]

    def deny(self, run_id, claim_key, reason, denied_by, now=None):
        """Record that this claim of the run may not go ahead; the first denial of it stands."""
        now = time.time() if now is None else now
        with self._connect() as connection:
            connection.execute("INSERT OR IGNORE INTO denials (claim_key, run_id, reason, denied_by, denied_at) "
                               "VALUES (?, ?, ?, ?, ?)", (claim_key, run_id, reason, denied_by, now))
        return self.denial_of(claim_key)

    def review(self, run_id, claim_key, released, reviewed_by, reason=None, now=None):
        """Record the IT officer's review of the held output of this claim of the run; the first review stands."""
        now = time.time() if now is None else now
        with self._connect() as connection:
            connection.execute("INSERT OR IGNORE INTO reviews (claim_key, run_id, released, reason, reviewed_by, "
                               "reviewed_at) VALUES (?, ?, ?, ?, ?, ?)",
                               (claim_key, run_id, released, reason, reviewed_by, now))
        return self.review_of(claim_key)

    def review_of(self, claim_key):
        with self._connect() as connection:
            row = connection.execute("SELECT run_id, released, reason, reviewed_by, reviewed_at FROM reviews "
                                     "WHERE claim_key = ?", (claim_key,)).fetchone()
        return Review(row[0], bool(row[1]), *row[2:]) if row else None

    def denial_of(self, claim_key):
        with self._connect() as connection:
            row = connection.execute("SELECT run_id, reason, denied_by, denied_at FROM denials WHERE claim_key = ?",
                                     (claim_key,)).fetchone()
        return Denial(*row) if row else None


@dataclass(frozen=True)
class Waiting:
    """Why a run waits: for what, in words the researcher sees."""
    reason: str


def needs_approval(policy, digest, researcher, claim_key, input_sha256, approvals, now):
    """(None, the approval that lets it run, or None under the whitelist policy) if the run, as claimed (its
    claim_key), may go ahead under the policy and the digest's approvals; else (Waiting, saying for what, None)."""
    if policy == WHITELIST:
        return None, None
    holding = [approval for approval in approvals if approval.holds_for(digest, researcher, now)]
    for approval in holding:
        if approval.claim_key is not None and approval.claim_key == claim_key:
            return None, approval
        if policy == APPROVE_NEW_DIGESTS and approval.run_id is None:
            return None, approval
    if policy == APPROVE_NEW_DIGESTS:
        return Waiting(f"waits for the site's IT officer to approve image {digest} (a digest the site has not "
                       "approved yet)"), None
    return Waiting(f"waits for the site's IT officer to approve this task (image {digest}, input sha256 "
                   f"{input_sha256}): the site approves every task"), None


def utc(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))
