from master import lifecycle


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
    assert lifecycle.task_status(["completed", "running"]) == "active"
    assert lifecycle.task_status(["completed", "completed"]) == "completed"
    assert lifecycle.task_status(["cancelled", "cancelled"]) == "cancelled"
    assert lifecycle.task_status(["completed", "refused"]) == "finished_with_errors"
