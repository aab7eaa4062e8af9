"""Disk limits against an algorithm that fills its folders: with one big file and with many small ones.

Site hospital-fs holds /output and /temp to their limits with a filesystem of fixed size each
(container.disk_limits filesystem, the default); hospital-poll measures the output every 2 s
and removes a session's /temp after one idle second. Each test prints what it measured: the
figures in docs/site-config.md come from here.
"""

import json
import os
import re

import pytest

from client import disk_limits
from client.disk_limits import FULL_MARGIN_BYTES, STEP_BYTES
from scripts.federation import LocalFederation
from tests.images import engine_or_fail, only_run, pushed_test_image, run_log, wait_until

FILESYSTEM_SITE, POLLING_SITE = "hospital-fs", "hospital-poll"
LIMIT_BYTES = 8 * 1024 ** 2
LIMIT_FILES = 200

LIMITS = {"max_output_bytes": LIMIT_BYTES, "max_output_files": LIMIT_FILES,
          "max_temp_bytes": LIMIT_BYTES, "max_temp_files": LIMIT_FILES}


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    # A session's /temp is checked before each claim (the registry asked which sessions are closed at most every
    # poll interval), and the tests wait for that: long-polls of 2 s, and the registry asked at each.
    with LocalFederation(site_names=(FILESYSTEM_SITE, POLLING_SITE), patients_per_site=3, start_runners=False,
                         site_settings={"max_concurrent_runs": 2, "long_poll_seconds": 2, "poll_interval_seconds": 0.2,
                                        "container": LIMITS}) as federation:
        federation.configure_site(POLLING_SITE, container={"disk_limits": "polling"}, session_idle_seconds=1)
        for name in federation.site_names:
            federation.start_runner(name)
        yield federation


@pytest.fixture(scope="module")
def filler():
    return pushed_test_image("disk-filler")


def fill(federation, filler, site, folder, files, session_id=None, **extra):
    """Run the filler at one site; returns (its run, what it said it wrote, its session's id)."""
    task = federation.researcher().submit(filler, {"folder": folder, "files": files, **extra}, sites=[site],
                                          session_id=session_id)
    run = only_run(federation, task, timeout_seconds=120)
    log = run_log(federation, run)
    said = re.search(r"^filler: (\{.*\})$", log, re.M)
    assert said, log
    return run, json.loads(said[1]), task["session_id"]


def filesystem_size(federation, where):
    """(image bytes, bytes it holds) of the filesystems the filesystem site's runner made, from its start-up log."""
    found = re.search(rf"{where}: a filesystem of (\d+) bytes per \w+, for (\d+) bytes",
                      federation.log_of(f"{FILESYSTEM_SITE}-runner"))
    assert found, federation.log_of(f"{FILESYSTEM_SITE}-runner")
    return int(found[1]), int(found[2])


def session_folder(federation, site, session_id):
    return federation.sites[site].config_path.parent / "work" / "sessions" / str(session_id)


def test_one_big_file_fills_the_output_to_its_limit_and_no_further(federation, filler):
    run, wrote, _session = fill(federation, filler, FILESYSTEM_SITE, "/output", "one")
    print(f"\n/output, one big file: wrote {wrote['bytes']} bytes against a limit of {LIMIT_BYTES}")
    assert wrote["error"] == "No space left on device"
    # The filesystem holds the limit, its margin and less than a step more (disk_limits.calibrate).
    assert LIMIT_BYTES < wrote["bytes"] < LIMIT_BYTES + FULL_MARGIN_BYTES + STEP_BYTES
    assert run["status"] == "failed"
    assert f"reached this site's limit of {LIMIT_BYTES} bytes" in run["reason"]
    assert run["output_sha256"] is None


def test_many_small_files_fill_the_output_to_its_file_limit(federation, filler):
    run, wrote, _session = fill(federation, filler, FILESYSTEM_SITE, "/output", "many")
    print(f"\n/output, many files: made {wrote['files']} files against a limit of {LIMIT_FILES}")
    assert wrote["error"] == "No space left on device"
    # /output itself, /output.txt, /log.txt and the filler's folder count too; ext4 rounds inodes up to 16.
    assert LIMIT_FILES - 4 <= wrote["files"] <= LIMIT_FILES + 16
    assert run["status"] == "failed"
    assert f"reached this site's limit of {LIMIT_FILES} files" in run["reason"]


def test_a_session_temp_holds_its_limit_on_the_sites_disk(federation, filler):
    run, wrote, session_id = fill(federation, filler, FILESYSTEM_SITE, "/temp", "one")
    image = session_folder(federation, FILESYSTEM_SITE, session_id) / "disk.img"
    os.sync()  # what the loop device still caches counts too
    on_disk = os.stat(image).st_blocks * 512
    image_bytes, holds = filesystem_size(federation, "/temp")
    print(f"\n/temp, one big file: wrote {wrote['bytes']} bytes against a limit of {LIMIT_BYTES}; the site's disk "
          f"holds {on_disk} bytes for it (at most {image_bytes}: {image_bytes - LIMIT_BYTES} over the limit)")
    assert wrote["error"] == "No space left on device"
    assert LIMIT_BYTES < wrote["bytes"] < LIMIT_BYTES + FULL_MARGIN_BYTES + STEP_BYTES
    assert holds == LIMIT_BYTES
    assert on_disk <= image_bytes
    # A full /temp is the algorithm's business (it may clean up and go on); the log says why writes failed.
    assert run["status"] == "completed", run["reason"]
    assert f"/temp reached this site's limit of {LIMIT_BYTES} bytes" in run_log(federation, run)


def test_many_small_files_fill_a_session_temp_to_its_file_limit(federation, filler):
    run, wrote, _session = fill(federation, filler, FILESYSTEM_SITE, "/temp", "many")
    print(f"\n/temp, many files: made {wrote['files']} files against a limit of {LIMIT_FILES}")
    assert wrote["error"] == "No space left on device"
    assert LIMIT_FILES - 2 <= wrote["files"] <= LIMIT_FILES + 16
    assert f"/temp reached this site's limit of {LIMIT_FILES} files" in run_log(federation, run)


def test_the_next_round_finds_the_session_temp_as_the_last_one_left_it(federation, filler):
    _first, wrote, session_id = fill(federation, filler, FILESYSTEM_SITE, "/temp", "many", at_most=50)
    _second, wrote_again, _session = fill(federation, filler, FILESYSTEM_SITE, "/temp", "many", session_id=session_id,
                                          at_most=LIMIT_FILES * 2)
    assert wrote == {"bytes": 0, "files": 50, "found": 0, "error": None}
    # The second round had the first round's 50 files on its filesystem, and room for the rest only.
    assert wrote_again["found"] == 50
    assert LIMIT_FILES - 2 - 50 <= wrote_again["files"] <= LIMIT_FILES + 16 - 50


def test_polling_stops_an_output_over_the_limit_but_only_after_it_was_written(federation, filler):
    run, wrote, _session = fill(federation, filler, POLLING_SITE, "/output", "one", at_most=4 * LIMIT_BYTES)
    print(f"\n/output, polled: wrote {wrote['bytes']} bytes against a limit of {LIMIT_BYTES} before the check")
    assert wrote["bytes"] == 4 * LIMIT_BYTES  # nothing stopped it while it wrote: what polling cannot do
    assert run["status"] == "failed"
    assert f"over this site's limit of {LIMIT_BYTES} bytes" in run["reason"]
    assert run["output_sha256"] is None


def test_an_idle_session_temp_is_removed(federation, filler):
    _run, _wrote, session_id = fill(federation, filler, POLLING_SITE, "/temp", "many", at_most=3)
    folder = session_folder(federation, POLLING_SITE, session_id)
    # Checked before every claim; this site long-polls for 2 s at a time.
    wait_until(lambda: not folder.exists(), f"{folder} to be removed after a second unused", timeout=30)
    assert "removed its /temp (no run used it for 1 s" in federation.log_of(f"{POLLING_SITE}-runner")


def test_a_closed_sessions_temp_is_unmounted_and_removed(federation, filler):
    _run, _wrote, session_id = fill(federation, filler, FILESYSTEM_SITE, "/temp", "many", at_most=3)
    folder = session_folder(federation, FILESYSTEM_SITE, session_id)
    assert disk_limits.mounted_under(folder) == [str(folder / "temp")]
    federation.researcher().close_session(session_id)
    wait_until(lambda: not folder.exists(), f"{folder} to be removed once the session is closed", timeout=30)
    assert disk_limits.mounted_under(folder) == []
    assert f"session {session_id}: removed its /temp (the researcher closed the session)" in federation.log_of(
        f"{FILESYSTEM_SITE}-runner")


def test_the_next_runs_filesystem_is_made_ahead_and_none_is_left_when_the_runner_stops(federation, filler):
    work = federation.sites[FILESYSTEM_SITE].config_path.parent / "work"
    spare_disk = work / "spare-run" / "disk"
    wait_until(lambda: os.path.ismount(spare_disk), "the next run's filesystem is made ahead")
    (spare_disk / "made-before-the-run").touch()
    run, wrote, _session_id = fill(federation, filler, FILESYSTEM_SITE, "/output", "many", at_most=3)
    assert run["status"] == "completed" and wrote["files"] == 3, run
    # The run took it, and a new one is made for the next (never the run's, given back); the polling site has none.
    wait_until(lambda: os.path.ismount(spare_disk) and os.listdir(spare_disk) == [], "a new one is made after the run")
    assert not (federation.sites[POLLING_SITE].config_path.parent / "work" / "spare-run").exists()
    assert federation.stop_runner(FILESYSTEM_SITE) == 0
    try:
        assert not spare_disk.parent.exists() and str(spare_disk) not in disk_limits.mounted_under(work)
    finally:
        federation.start_runner(FILESYSTEM_SITE)
