"""The life of a run: its named states and the decisions that move it between them.

Pure functions only (no I/O), so every rule here is covered by plain unit tests.

    pending ──claim──> claimed ──start──> running ──finish──> completed | failed
       │                  │                  │
       │                  ├──refuse──> refused (the site would not run it; reason given)
       │                  └──lease runs out──> expired ──> pending again, or failed
       │                                       after MAX_ATTEMPTS claims
       └──(any non-terminal state)──cancel──> cancelled

"expired" is recorded in a run's history at the moment its lease ran out; the run
itself moves on at once (back to pending, or to failed), so listings never show it
as a current state.
"""

PENDING = "pending"
CLAIMED = "claimed"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
REFUSED = "refused"
CANCELLED = "cancelled"
EXPIRED = "expired"

ACTIVE_STATES = (CLAIMED, RUNNING)
TERMINAL_STATES = (COMPLETED, FAILED, REFUSED, CANCELLED)
CANCELLABLE_STATES = (PENDING, CLAIMED, RUNNING)

# How often a run may be claimed and lose its lease before it is given up on:
# a run that kills its runner every time must not circle forever.
MAX_ATTEMPTS = 3


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
        return "active"
    if all(s == COMPLETED for s in run_statuses):
        return "completed"
    if all(s == CANCELLED for s in run_statuses):
        return "cancelled"
    return "finished_with_errors"
