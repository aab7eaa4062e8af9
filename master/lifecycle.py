"""The life of a run: its named states, the moves between them, and the decisions that pick a move.

Defined once, here; the registry's schemas and store, the researcher library and the site runner
all use these names, and a test checks that no other module spells a state by hand. Pure (no I/O),
so every rule is covered by plain unit tests; the store refuses any move TRANSITIONS does not list.

    pending ──claim──> claimed ──start──> running ──finish──> completed | failed
       │                │   ▲                │  ▲
       │                │   │ approved       │  │ released
       │                │   │                │  │
       │                ├─> awaiting_approval│  └── held_for_review <── hold (the site's airlock)
       │                │     (the site's IT officer decides; denied ──> refused)
       │                ├──refuse──> refused (the site would not run it; reason given)
       │                └──lease runs out──> expired ──> pending again, or failed after MAX_ATTEMPTS claims
       ├──(any state that has not ended)──cancel──> cancelled (by the researcher, or the researcher was revoked)
       └──(any state that has not ended)──────────> failed (the site was revoked)

A site that needs no approval before a run may ask its claim to start a run whose image is pinned by digest:
the claim moves it to claimed and on to running, with that digest, and the site sends no start report. The site
may still refuse such a run from running, as long as nothing else happened to it: no other move, no result or
delivery of it (master/store.py, started_by_claim).

"expired" is recorded in a run's history at the moment its lease ran out; the run itself moves on
at once (back to pending, or to failed), so listings never show it as a current state.

A run awaiting approval or held for review is parked at its site: the site keeps its lease (so only
it can go on with the run) but the lease does not run out, so waiting for a person costs neither a
worker slot at the site nor one of the run's attempts.
"""

from enum import StrEnum


class RunStatus(StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    AWAITING_APPROVAL = "awaiting_approval"  # the site's IT officer must approve its image (or the task) first
    RUNNING = "running"
    HELD_FOR_REVIEW = "held_for_review"  # it ended; the site's IT officer reviews its output before it leaves
    COMPLETED = "completed"
    FAILED = "failed"
    REFUSED = "refused"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # in a run's history only


class TaskStatus(StrEnum):
    """One word for a task, derived from its runs (task_status), never stored."""
    ACTIVE = "active"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FINISHED_WITH_ERRORS = "finished_with_errors"


PENDING, CLAIMED, AWAITING_APPROVAL, RUNNING, HELD_FOR_REVIEW = (
    RunStatus.PENDING, RunStatus.CLAIMED, RunStatus.AWAITING_APPROVAL, RunStatus.RUNNING, RunStatus.HELD_FOR_REVIEW)
COMPLETED, FAILED, REFUSED, CANCELLED, EXPIRED = (
    RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.REFUSED, RunStatus.CANCELLED, RunStatus.EXPIRED)

# Every move a run may make: its state now -> the states it may go to next.
TRANSITIONS = {
    PENDING: {CLAIMED, CANCELLED, FAILED},
    CLAIMED: {RUNNING, AWAITING_APPROVAL, REFUSED, FAILED, CANCELLED, EXPIRED},
    AWAITING_APPROVAL: {CLAIMED, REFUSED, CANCELLED, FAILED},
    RUNNING: {COMPLETED, FAILED, HELD_FOR_REVIEW, CANCELLED, EXPIRED, REFUSED},
    HELD_FOR_REVIEW: {RUNNING, CANCELLED, FAILED},
    EXPIRED: {PENDING, FAILED},
    COMPLETED: set(), FAILED: set(), REFUSED: set(), CANCELLED: set(),
}

TERMINAL_STATES = tuple(state for state, after in TRANSITIONS.items() if not after)
# A states listing may show (EXPIRED is a moment in a run's history, not a state it stays in).
CURRENT_STATES = tuple(state for state in RunStatus if state != EXPIRED)
# The site holds the run's lease and must renew it, or the run goes back to the queue.
LEASED_STATES = (CLAIMED, RUNNING)
# The site holds the run's lease, which does not run out, while a person at the site decides.
PARKED_STATES = (AWAITING_APPROVAL, HELD_FOR_REVIEW)
CANCELLABLE_STATES = tuple(state for state, after in TRANSITIONS.items() if CANCELLED in after)
# What a revoked site's runs may be in when they are failed: every state that has not ended.
FAILABLE_STATES = tuple(state for state in CURRENT_STATES if FAILED in TRANSITIONS[state])
# What the site runner parks a run as, and the state the run goes back to when the site goes on with it.
PARKED_FROM = {AWAITING_APPROVAL: CLAIMED, HELD_FOR_REVIEW: RUNNING}

# How often a run may be claimed and lose its lease before it is given up on:
# a run that kills its runner every time must not circle forever.
MAX_ATTEMPTS = 3


class NotAllowed(Exception):
    """A move TRANSITIONS does not list."""


def check_move(current, new):
    """Raises NotAllowed unless a run in state current may move to new."""
    if RunStatus(new) not in TRANSITIONS[RunStatus(current)]:
        raise NotAllowed(f"a run that is {current} cannot become {new}")


def status_after_finish(exit_code, failure_reason):
    """A run is completed only when its container exited 0 and the runner saw no error."""
    if failure_reason is None and exit_code == 0:
        return COMPLETED
    return FAILED


def failure_reason_for(exit_code, failure_reason):
    if failure_reason is not None:
        return failure_reason
    if exit_code != 0:
        return f"algorithm exited with code {exit_code}"
    return None


def status_after_expiry(attempts):
    """A run whose lease ran out goes back to the queue, until it has used up its attempts."""
    return PENDING if attempts < MAX_ATTEMPTS else FAILED


def task_status(run_statuses):
    """One word for a task, derived from its runs: active while any run may still change."""
    if any(s not in TERMINAL_STATES for s in run_statuses):
        return TaskStatus.ACTIVE
    if all(s == COMPLETED for s in run_statuses):
        return TaskStatus.COMPLETED
    if all(s == CANCELLED for s in run_statuses):
        return TaskStatus.CANCELLED
    return TaskStatus.FINISHED_WITH_ERRORS
