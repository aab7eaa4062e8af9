"""A site that approves what runs: image digests approved by its IT officer before their first run, a task
at a time when the site says so, decided from the runner's own command line, on the real engine.

One runner, one worker slot (max_concurrent_runs 1), so a run that waits must not hold it."""

import json
import os
import signal
import subprocess
import sys

import docker
import pytest

from client import containers, disk_limits
from client.audit_log import entries_of_run
from client.officer_commands import CommandFailed, Officer
from client.site_config import load_site_config
from master import lifecycle
from scripts.federation import IMAGE_REGISTRY, ROOT, LocalFederation
from tests.images import engine_or_fail, pushed_test_image, registry_digest, run_of, states, wait_until

SITE = "hospital-a"
MOVING_TAG = f"{IMAGE_REGISTRY}/pht/approval-probe:current"


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    with LocalFederation(site_names=(SITE,), patients_per_site=5, whitelist=[r"127\.0\.0\.1:[0-9]+/pht/.*"],
                         site_settings={"approval_policy": "approve_new_digests", "max_concurrent_runs": 1,
                                        "long_poll_seconds": 2, "poll_interval_seconds": 0.2}) as federation:
        yield federation


def officer(federation, **options):
    return Officer(load_site_config(federation.sites[SITE].config_path), by="it-officer", out=lambda line: None,
                   **options)


def status_of(federation, task):
    return run_of(federation, task)["status"]


def wait_for_status(federation, task, status, timeout=60):
    wait_until(lambda: status_of(federation, task) == status, f"task {task['id']}'s run is {status}", timeout)
    return run_of(federation, task)


def site_containers(federation):
    work = federation.folder / SITE / "work"
    return containers.containers_of(docker.from_env(), SITE, work)


def last_config_taken_up(federation):
    """What the runner's log said it took up last time its config changed."""
    return federation.log_of(f"{SITE}-runner").rsplit("config taken up again: ", 1)[-1]


def story(federation, run):
    """The events of the run in the site's audit log."""
    return [entry["event"] for entry in entries_of_run(federation.folder / SITE / "work" / "audit.jsonl", run["id"])]


def test_a_new_digest_waits_for_approval_without_holding_the_only_slot(federation):
    researcher = federation.researcher()
    first_image = pushed_test_image("contract-probe", MOVING_TAG, VERSION="approval-first")
    first = researcher.submit(first_image, {})
    waiting = wait_for_status(federation, first, lifecycle.AWAITING_APPROVAL)
    digest = registry_digest(MOVING_TAG)
    assert waiting["image_digest"] == digest
    assert digest in waiting["reason"] and "IT officer" in waiting["reason"]
    assert not site_containers(federation), "nothing runs while it waits"
    assert not disk_limits.mounted_under(federation.folder / SITE / "work" / "runs"), "nor holds a filesystem"

    # Another image, approved beforehand: it runs in the one slot while the first still waits.
    other_image = pushed_test_image("contract-probe", VERSION="approval-other")
    officer(federation).approve(digest=registry_digest(other_image))
    other = researcher.wait(researcher.submit(other_image, {})["id"], timeout_seconds=120)
    assert other["runs"][0]["status"] == lifecycle.COMPLETED, other["runs"][0]["reason"]
    assert status_of(federation, first) == lifecycle.AWAITING_APPROVAL

    officer(federation).approve(waiting["id"])
    [done] = researcher.wait(first["id"], timeout_seconds=120)["runs"]
    assert done["status"] == lifecycle.COMPLETED, done["reason"]
    assert done["attempts"] == 1, "waiting used none of the run's attempts"
    assert states(federation, done) == ["pending", "claimed", "awaiting_approval", "claimed", "running", "completed"]
    assert story(federation, done).count("image_pulled") == 1, "the image was pulled once, before it waited"

    # The same digest again goes ahead at once.
    again = researcher.wait(researcher.submit(first_image, {})["id"], timeout_seconds=120)["runs"][0]
    assert again["status"] == lifecycle.COMPLETED, again["reason"]
    assert lifecycle.AWAITING_APPROVAL not in states(federation, again)


def test_a_repointed_tag_waits_again_and_a_denial_reaches_the_researcher(federation):
    researcher = federation.researcher()
    pushed_test_image("contract-probe", MOVING_TAG, VERSION="approval-first")
    pushed_test_image("contract-probe", MOVING_TAG, VERSION="approval-repointed")
    task = researcher.submit(MOVING_TAG, {})  # pinned at submit to the digest the tag names now
    waiting = wait_for_status(federation, task, lifecycle.AWAITING_APPROVAL)
    assert waiting["image_digest"] == registry_digest(MOVING_TAG)

    officer(federation).deny(waiting["id"], "this version was not reviewed by our DPO")
    [refused] = researcher.wait(task["id"], timeout_seconds=60)["runs"]
    assert refused["status"] == lifecycle.REFUSED
    assert refused["reason"] == "denied by the site's IT officer (it-officer): this version was not reviewed by our DPO"
    wait_until(lambda: not (federation.folder / SITE / "work" / "runs" / str(refused["id"])).exists(),
               "the denied run's folder is removed")


def test_an_expired_approval_waits_again_and_the_researcher_can_cancel(federation):
    researcher = federation.researcher()
    image = pushed_test_image("contract-probe", VERSION="approval-expired")
    two_days_ago = officer(federation, now=lambda: __import__("time").time() - 2 * 24 * 3600)
    two_days_ago.approve(digest=registry_digest(image), days=1)
    task = researcher.submit(image, {})
    waiting = wait_for_status(federation, task, lifecycle.AWAITING_APPROVAL)

    researcher.cancel(task["id"])
    assert status_of(federation, task) == lifecycle.CANCELLED
    wait_until(lambda: not (federation.folder / SITE / "work" / "runs" / str(waiting["id"])).exists(),
               "the site lets go of the cancelled run")
    assert "cancelled" in story(federation, waiting)
    with pytest.raises(CommandFailed, match=f"run {waiting['id']} is not awaiting approval"):
        officer(federation).approve(waiting["id"])


def test_every_task_waits_once_the_site_says_so_without_a_restart(federation):
    researcher = federation.researcher()
    image = pushed_test_image("contract-probe", VERSION="approval-other")  # its digest is approved
    runner = federation.sites[SITE].runner
    federation.configure_site(SITE, approval_policy="approve_every_task")
    wait_until(lambda: "approval_policy approve_every_task" in federation.log_of(f"{SITE}-runner"),
               "the runner takes up the changed config")
    try:
        first = researcher.submit(image, {"round": 1})
        waiting = wait_for_status(federation, first, lifecycle.AWAITING_APPROVAL)
        assert "approve every task" in waiting["reason"] or "approves every task" in waiting["reason"]
        officer(federation).approve(waiting["id"])
        assert researcher.wait(first["id"], timeout_seconds=120)["runs"][0]["status"] == lifecycle.COMPLETED

        second = researcher.submit(image, {"round": 2})
        wait_for_status(federation, second, lifecycle.AWAITING_APPROVAL)
        researcher.cancel(second["id"])
    finally:
        federation.configure_site(SITE, approval_policy="approve_new_digests")
        wait_until(lambda: last_config_taken_up(federation).startswith("approval_policy approve_new_digests"),
                   "the runner takes up the config as it was")
    assert runner.poll() is None, "the runner was not restarted"


def test_a_config_that_fails_its_checks_is_not_taken_up(federation):
    federation.configure_site(SITE, approval_policy="approve_everything")
    try:
        wait_until(lambda: "the changed config is not taken up" in federation.log_of(f"{SITE}-runner"),
                   "the runner refuses the broken config")
        assert "approval_policy 'approve_everything' must be one of" in federation.log_of(f"{SITE}-runner")
    finally:
        federation.configure_site(SITE, approval_policy="approve_new_digests")


def test_sighup_takes_up_a_change_that_the_files_times_do_not_show(federation):
    """A config put in place with its old time and size (copied with cp -p, say) is taken up on SIGHUP."""
    path = federation.sites[SITE].config_path
    before, status = path.read_text(), path.stat()
    changed = before.replace('"approve_new_digests"', '"whitelist"')
    changed = changed.rstrip("\n") + " " * (len(before) - len(changed.rstrip("\n")))
    assert len(changed) == len(before) and changed != before
    taken_up = "approval_policy whitelist"
    seen = federation.log_of(f"{SITE}-runner").count(taken_up)
    path.write_text(changed)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    federation.sites[SITE].runner.send_signal(signal.SIGHUP)
    try:
        wait_until(lambda: federation.log_of(f"{SITE}-runner").count(taken_up) > seen,
                   "the runner takes up the config on SIGHUP")
    finally:
        federation.configure_site(SITE, approval_policy="approve_new_digests")
        wait_until(lambda: last_config_taken_up(federation).startswith("approval_policy approve_new_digests"),
                   "the runner takes up the config as it was")


def test_the_officer_commands_from_the_command_line(federation):
    config = str(federation.sites[SITE].config_path)
    researcher = federation.researcher()
    image = pushed_test_image("contract-probe", VERSION="approval-cli")
    task = researcher.submit(image, "\x1b]0;owned\x07\x1b[2J cleared?\nsecond line")
    waiting = wait_for_status(federation, task, lifecycle.AWAITING_APPROVAL)

    def command(*words):
        return subprocess.run([sys.executable, str(ROOT / "client" / "runScript.py"), *words, "--config", config],
                              capture_output=True, text=True, timeout=60)

    researcher_cli = subprocess.run(
        [sys.executable, "-m", "researcher", "wait", str(task["id"]), "--timeout", "1"], capture_output=True,
        text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PHT_REGISTRY_URL": federation.registry_url, "PHT_TOKEN": federation.researcher_token})
    assert researcher_cli.returncode == 3, researcher_cli.stderr
    assert f"{SITE}: awaiting_approval (waits for the site's IT officer to approve image " in researcher_cli.stderr

    listed = command("approvals", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"run {waiting['id']}" in listed.stdout and registry_digest(image) in listed.stdout
    shown = command("approvals", "show", str(waiting["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "earlier approvals of this digest: 0" in shown.stdout
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "?]0;owned??[2J cleared?\nsecond line" in shown.stdout
    approved = command("approvals", "approve", str(waiting["id"]), "--by", "dr-officer", "--days", "30")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.rstrip().endswith("the runner goes on within 0.2 s"), approved.stdout  # the config's
    assert researcher.wait(task["id"], timeout_seconds=120)["runs"][0]["status"] == lifecycle.COMPLETED
    verified = command("audit", "verify")
    assert verified.returncode == 0 and "the chain is intact" in verified.stdout, verified.stdout + verified.stderr
    told = command("audit", "show", "--run", str(waiting["id"]))
    assert "approved" in told.stdout and "by=dr-officer" in told.stdout
    unknown = command("approvals", "deny", "999999", "--reason", "no")
    assert unknown.returncode == 1 and "run 999999 is not awaiting approval" in unknown.stderr
    assert json.loads(federation.sites[SITE].config_path.read_text())["approval_policy"] == "approve_new_digests"
