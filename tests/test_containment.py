"""Each containment limit, enforced against a hostile image that tries to break it.

One site with the default network (none) and small limits. Every hostile task is
submitted at once, so they run side by side (as at a busy site); each test then
reads how its task ended.
"""

from datetime import datetime

import docker
import pytest

from client import containers
from scripts.federation import IMAGE_REGISTRY, LocalFederation
from tests.images import (algorithm_containers, engine_or_fail, history, output_files, output_json, pushed_test_image,
                          run_log, wait_for_runs, wait_until)

SITE = "hospital-a"
LIMITS = {"network": "none", "memory": "64m", "pids": 32, "max_output_bytes": 1024 ** 2, "timeout_seconds": 60}


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    with LocalFederation(site_names=(SITE,), patients_per_site=5, container_network="none",
                         site_settings={"max_concurrent_runs": 4, "container": LIMITS}) as federation:
        yield federation


@pytest.fixture(scope="module")
def host_secret(tmp_path_factory):
    secret = tmp_path_factory.mktemp("host") / "secret.txt"
    secret.write_text("a file on the host that no algorithm may send out")
    return secret


@pytest.fixture(scope="module")
def tasks(federation, host_secret):
    """Every hostile task, submitted at once: name -> task."""
    researcher = federation.researcher()
    inputs = {
        "endless-loop": ("endless-loop", {}, 3),
        "fork-bomb": ("fork-bomb", {}, None),
        "memory-hog": ("memory-hog", {}, None),
        "input-writer": ("input-writer", {"keep": "me"}, None),
        "output-symlink": ("output-symlink", {"links": {
            "secret.txt": str(host_secret), "passwd": "/etc/passwd", "escape": "../../../../../etc/hostname"}}, None),
        "output-flood-while-running": ("output-flood", {"megabytes": 8, "then_sleep": 50}, None),
        "output-flood-at-the-end": ("output-flood", {"megabytes": 2, "then_sleep": 0}, None),
        "log-flood": ("log-flood", {"megabytes": 100}, None),
        "network-probe": ("network-probe", {"name": "example.org", "addresses": [
            f"127.0.0.1:{federation.registry_port}", IMAGE_REGISTRY,
            federation.sites[SITE].sparql_endpoint.split("/")[2]]}, None),
    }
    return {name: researcher.submit(pushed_test_image(image), task_input, timeout_seconds=timeout)
            for name, (image, task_input, timeout) in inputs.items()}


@pytest.fixture(scope="module")
def runs(federation, tasks):
    """name -> the task's one run, once every task has ended."""
    return {name: wait_for_runs(federation, task, timeout_seconds=120)[0] for name, task in tasks.items()}


def test_endless_loop_is_killed_at_the_timeout(federation, runs):
    run = runs["endless-loop"]
    assert run["status"] == "failed"
    assert run["reason"].startswith("timeout"), run["reason"]
    assert run["output_sha256"] is None
    assert "looping forever" in run_log(federation, run)


def test_fork_bomb_is_stopped_by_the_pids_limit(federation, runs):
    run = runs["fork-bomb"]
    assert run["status"] == "completed", run["reason"]
    forks = output_json(federation, run, "forks.json")
    assert forks["forked"] < LIMITS["pids"]
    assert "Resource temporarily unavailable" in forks["refusal"]


def test_memory_hog_is_killed_and_reported_out_of_memory(federation, runs):
    run = runs["memory-hog"]
    assert run["status"] == "failed"
    assert run["reason"].startswith("out of memory"), run["reason"]
    assert LIMITS["memory"] in run["reason"]
    assert "got 4 GB" not in run_log(federation, run)


def test_input_and_image_cannot_be_changed(federation, runs):
    run = runs["input-writer"]
    assert run["status"] == "completed", run["reason"]
    report = output_json(federation, run, "attempts.json")
    assert len(report["attempts"]) == 7
    for attempt, result in report["attempts"].items():
        assert result.startswith("refused"), (attempt, result)
    # Not only file permissions: the root filesystem and the input are mounted read-only.
    assert report["read_only"] == {"/": True, "/input": True, "/input.txt": True}


def test_links_out_of_output_are_not_uploaded(federation, runs, host_secret):
    run = runs["output-symlink"]
    assert run["status"] == "completed", run["reason"]
    files = output_files(federation, run)
    assert files == {"honest.txt": b"the only real result", "nested": None}
    log = run_log(federation, run)
    assert "not uploaded (links or special files): escape, passwd, secret.txt, nested/etc-folder" in log
    assert host_secret.read_text() == "a file on the host that no algorithm may send out"


def test_output_cannot_grow_past_the_limit_and_is_not_uploaded(federation, runs):
    """The output lives on a filesystem of the limit's size: the algorithm's write fails, not the site's disk.
    (tests/test_disk_limits.py measures it, and covers disk_limits polling.)"""
    for name in ("output-flood-while-running", "output-flood-at-the-end"):
        run = runs[name]
        assert run["status"] == "failed"
        assert "reached this site's limit of 1048576 bytes" in run["reason"], run["reason"]
        assert run["output_sha256"] is None
    # 8 MB does not fit; 2 MB fits in the filesystem's margin, and is still over the limit.
    assert "No space left on device" in run_log(federation, runs["output-flood-while-running"])
    assert "wrote 2 MB" in run_log(federation, runs["output-flood-at-the-end"])
    # It ended at its first write past the limit, not after the image's 50 s.
    events = {event["status"]: event["at"] for event in history(federation, runs["output-flood-while-running"])}
    assert seconds_between(events["running"], events["failed"]) < 20


def test_a_log_flood_keeps_its_first_and_last_lines_and_says_what_was_dropped(federation, runs):
    run = runs["log-flood"]
    assert run["status"] == "completed", run["reason"]
    log = run_log(federation, run)  # as text: the binary part does not matter here
    assert log.startswith("FIRST LINE: what the algorithm set out to do\n")
    kept = 10 * 1024 ** 2  # client/log_keeper.py: HEAD_BYTES and TAIL_BYTES
    printed = len("FIRST LINE: what the algorithm set out to do\n") + 100 * 1024 ** 2 + len("\nLAST LINE: why it stopped\n")
    assert f"[site runner] {printed - 2 * kept} bytes of the log dropped here (it kept the first {kept} and the " \
           f"last {kept})" in log
    assert "\nLAST LINE: why it stopped\n" in log[-2000:]


def seconds_between(start, end):
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def test_network_cannot_be_reached(federation, runs):
    run = runs["network-probe"]
    assert run["status"] == "completed", run["reason"]
    reach = output_json(federation, run, "reach.json")
    assert reach.pop("interfaces") == ["lo"]
    for address, result in reach.items():
        assert result.startswith("failed"), (address, result)


def test_nothing_is_left_behind(federation, runs):
    engine = docker.from_env()
    work_dir = federation.folder / SITE / "work"
    # A run's container and folder go right after its result is reported: the registry may hear of it a moment
    # before. Its relay may stay, kept for its session's next run: at most max_concurrent_runs of them
    # (tests/test_relay_pool.py).
    wait_until(lambda: not algorithm_containers(SITE, work_dir), "every algorithm's container is removed")
    assert len(containers.containers_of(engine, SITE, work_dir)) <= 4
    wait_until(lambda: not list((work_dir / "runs").iterdir()), "every run's folder is removed")
    # Every hostile run ended in a reason the runner expected: none broke the runner itself.
    assert "Traceback" not in federation.log_of(f"{SITE}-runner")
