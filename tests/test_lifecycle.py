import ast
from pathlib import Path

import pytest

from master import lifecycle
from master.lifecycle import RunStatus, TaskStatus

ROOT = Path(__file__).resolve().parent.parent


def test_exit_code_zero_without_runner_error_completes():
    assert lifecycle.status_after_finish(0, None) == lifecycle.COMPLETED


def test_non_zero_exit_or_runner_error_fails_with_reason():
    assert lifecycle.status_after_finish(3, None) == lifecycle.FAILED
    assert lifecycle.failure_reason_for(3, None) == "algorithm exited with code 3"
    assert lifecycle.status_after_finish(0, "timeout") == lifecycle.FAILED
    assert lifecycle.failure_reason_for(None, "timeout") == "timeout"


def test_expired_runs_are_requeued_until_attempts_run_out():
    assert lifecycle.status_after_expiry(1) == lifecycle.PENDING
    assert lifecycle.status_after_expiry(lifecycle.MAX_ATTEMPTS - 1) == lifecycle.PENDING
    assert lifecycle.status_after_expiry(lifecycle.MAX_ATTEMPTS) == lifecycle.FAILED


def test_task_status_is_derived_from_its_runs():
    assert lifecycle.task_status([RunStatus.COMPLETED, RunStatus.RUNNING]) == TaskStatus.ACTIVE
    assert lifecycle.task_status([RunStatus.COMPLETED, RunStatus.COMPLETED]) == TaskStatus.COMPLETED
    assert lifecycle.task_status([RunStatus.CANCELLED, RunStatus.CANCELLED]) == TaskStatus.CANCELLED
    assert lifecycle.task_status([RunStatus.COMPLETED, RunStatus.REFUSED]) == TaskStatus.FINISHED_WITH_ERRORS
    # A run waiting for a person at its site has not ended: its task is still active.
    for parked in lifecycle.PARKED_STATES:
        assert lifecycle.task_status([RunStatus.COMPLETED, parked]) == TaskStatus.ACTIVE


def test_every_state_has_its_moves_and_ended_states_have_none():
    assert set(lifecycle.TRANSITIONS) == set(RunStatus)
    assert set(lifecycle.TERMINAL_STATES) == {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.REFUSED,
                                              RunStatus.CANCELLED}
    for state, after in lifecycle.TRANSITIONS.items():
        assert after <= set(RunStatus), state


def test_every_state_fits_the_registrys_status_columns():
    from master import store
    longest = max(len(state) for state in RunStatus)
    assert longest <= store.runs.c.status.type.length == store.run_events.c.status.type.length


def test_parked_runs_go_back_where_they_came_from_and_can_be_cancelled():
    for parked, resumed in lifecycle.PARKED_FROM.items():
        lifecycle.check_move(resumed, parked)
        lifecycle.check_move(parked, resumed)
        lifecycle.check_move(parked, RunStatus.CANCELLED)
    # A denied approval refuses the run; output held for review is never refused after it ran.
    lifecycle.check_move(RunStatus.AWAITING_APPROVAL, RunStatus.REFUSED)
    with pytest.raises(lifecycle.NotAllowed):
        lifecycle.check_move(RunStatus.HELD_FOR_REVIEW, RunStatus.REFUSED)


@pytest.mark.parametrize("current, new", [
    (RunStatus.PENDING, RunStatus.RUNNING),  # it must be claimed first
    (RunStatus.COMPLETED, RunStatus.FAILED),  # an ended run stays as it ended
    (RunStatus.CANCELLED, RunStatus.PENDING),
    (RunStatus.AWAITING_APPROVAL, RunStatus.RUNNING),  # approved, it is claimed again, then started
    (RunStatus.AWAITING_APPROVAL, RunStatus.EXPIRED),  # a parked run's lease does not run out
    (RunStatus.HELD_FOR_REVIEW, RunStatus.EXPIRED),
])
def test_moves_the_lifecycle_does_not_list_are_refused(current, new):
    with pytest.raises(lifecycle.NotAllowed, match=f"{current} cannot become {new}"):
        lifecycle.check_move(current, new)


# Modules where these words mean something other than a run's or a task's state: Docker's container
# states, the SPARQL gateway's verdict on a query, a site's token (active or revoked).
OTHER_MEANINGS = {"client/containers.py", "client/sparql_gateway.py", "master/TaskMaster.py"}


def test_no_module_spells_a_state_by_hand():
    """States are named in master/lifecycle.py only: everything else uses its names, so a new state or a
    renamed one is a change in one place."""
    words = {str(state) for state in RunStatus} | {str(state) for state in TaskStatus}
    spelled = []
    for folder in ("master", "client", "researcher", "scripts", "examples", "algorithms", "fileservice", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name == "master/lifecycle.py" or name in OTHER_MEANINGS:
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            # A SPARQL summary's count of refused queries is the key "refused", as in summary["refused"].
            keys = {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
            keys |= {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in words and id(node) not in keys:
                    spelled.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not spelled, "use master.lifecycle's names instead:\n" + "\n".join(spelled)
