"""The decisions behind disk limits and session folders, and the filesystems themselves (root, no Docker)."""

import os

import pytest

from client import disk_limits
from client.claim import parse_claim
from client.disk_limits import FULL_MARGIN_BYTES, MIB, STEP_BYTES, DiskSize, next_guess
from client.run_folder import RunFolder, SpareRunFolder, unfinished_runs
from client.session_folders import SessionFolders, sessions_to_remove

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")


def test_the_size_search_stops_within_a_step_above_what_is_wanted():
    assert next_guess(20 * MIB, 10 * MIB, 10 * MIB) is None
    assert next_guess(20 * MIB, 10 * MIB, 10 * MIB + STEP_BYTES - 1) is None
    # Too small: grow by what was missing; too large: shrink by the excess; always in whole steps.
    assert next_guess(20 * MIB, 10 * MIB, 10 * MIB - 5000) == 20 * MIB + STEP_BYTES
    assert next_guess(20 * MIB, 10 * MIB, 12 * MIB) == 18 * MIB


def test_sessions_are_removed_when_closed_or_idle_and_never_while_a_run_uses_them():
    held = {1: 1000.0, 2: 1000.0, 3: 1090.0, 4: 1000.0}
    removable = sessions_to_remove(held, active={4}, closed={1, 4}, now=1100.0, idle_seconds=60, max_sessions=20)
    assert removable == {1: "the researcher closed the session",
                         2: "no run used it for 60 s (session_idle_seconds)"}


def test_past_max_sessions_the_least_recently_used_go_but_never_one_in_use():
    """A registry that opens a session for every run cannot make the site keep a /temp for each."""
    held = {session_id: 1000.0 + session_id for session_id in range(1, 11)}  # 10 the most recent
    removable = sessions_to_remove(held, active={1}, closed=set(), now=1020.0, idle_seconds=3600, max_sessions=3)
    # 1 is in use (and counts towards the three kept); 10 and 9 were used last.
    assert set(removable) == {2, 3, 4, 5, 6, 7, 8}
    assert removable[2] == ("this site keeps the /temp of 3 sessions (max_sessions), and this one was used least "
                            "recently")
    assert sessions_to_remove(held, active=set(range(1, 11)), closed=set(), now=1020.0, idle_seconds=3600,
                              max_sessions=3) == {}


@needs_root
def test_a_filesystem_holds_its_limit_and_counts_as_full_only_past_it(tmp_path):
    size = disk_limits.calibrate(tmp_path / "check", 4 * MIB, 50)
    assert size.image_bytes > 4 * MIB
    mountpoint = tmp_path / "run" / "disk"
    mountpoint.parent.mkdir()
    disk_limits.mount(tmp_path / "run" / "disk.img", mountpoint, size)
    disk_limits.mount(tmp_path / "run" / "disk.img", mountpoint, size)  # already mounted: nothing happens
    assert disk_limits.mounted_under(tmp_path) == [str(mountpoint)]
    assert os.listdir(mountpoint) == []  # no lost+found
    (mountpoint / "exactly-the-limit").write_bytes(b"\1" * 4 * MIB)
    assert disk_limits.full_reason(mountpoint, "/output", size) is None
    with pytest.raises(OSError, match="No space left"):
        with open(mountpoint / "more", "wb", buffering=0) as more:
            for _ in range(2 * FULL_MARGIN_BYTES // 65536):
                more.write(b"\2" * 65536)
    assert disk_limits.full_reason(mountpoint, "/output", size) == "/output reached this site's limit of 4194304 bytes"
    disk_limits.remove_folder(tmp_path / "run")
    assert not (tmp_path / "run").exists() and disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_a_folder_in_use_is_not_deleted_under_its_user(tmp_path):
    sessions = SessionFolders(tmp_path / "sessions", disk_limits.calibrate(tmp_path / "check", MIB, 10))
    temp = sessions.temp_for(7)
    (temp / "state").write_text("round 1")
    assert sessions.temp_for(7) == temp and (temp / "state").read_text() == "round 1"
    with open(temp / "state"):  # as a container that still runs would hold it
        sessions.remove(7, "closed")
        assert (temp / "state").read_text() == "round 1"
    sessions.remove(7, "closed")
    assert sessions.held() == {}
    assert disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_an_image_left_unmounted_by_a_reboot_is_mounted_again_with_its_files(tmp_path):
    size = DiskSize(MIB, 10, 8 * MIB)
    disk_limits.mount(tmp_path / "disk.img", tmp_path / "temp", size)
    (tmp_path / "temp" / "kept").write_text("from before")
    disk_limits.release(tmp_path / "temp")
    disk_limits.mount(tmp_path / "disk.img", tmp_path / "temp", size)
    assert (tmp_path / "temp" / "kept").read_text() == "from before"
    disk_limits.release(tmp_path / "temp")


def claim_of_run(run_id):
    return parse_claim({"id": run_id, "task_id": 5, "session_id": 3, "image": "127.0.0.1:5050/pht/x:1",
                        "lease_id": "l", "lease_seconds": 30, "timeout_seconds": None, "recipients": []})


@needs_root
def test_a_spare_run_folder_goes_to_one_run_and_holds_nothing_an_earlier_run_wrote(tmp_path):
    spare = SpareRunFolder(tmp_path / "spare-run", DiskSize(MIB, 10, 8 * MIB))
    spare.make()
    first = RunFolder.create(tmp_path / "runs", claim_of_run(7), spare)
    assert disk_limits.mounted_under(tmp_path) == [str(first.disk)], "the spare's filesystem is the run's now"
    (first.disk / "output").mkdir()
    (first.disk / "output" / "row-level.csv").write_text("patient 1")
    second = RunFolder.create(tmp_path / "runs", claim_of_run(8), spare)
    assert [path.name for path in second.path.iterdir()] == ["state.json"], "none was ready: a folder of its own"
    spare.make()
    spare.make()  # one is ready: nothing happens
    third = RunFolder.create(tmp_path / "runs", claim_of_run(9), spare)
    assert os.listdir(third.disk) == [], "a new filesystem, not one given back"
    assert not spare.path.exists()
    spare.make()
    spare.remove()
    for folder in (first, second, third):
        folder.remove()
    assert list(tmp_path.iterdir()) == [tmp_path / "runs"] and disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_a_spare_run_folder_that_cannot_be_moved_is_no_run_s_failure(tmp_path):
    spare = SpareRunFolder(tmp_path / "spare-run", DiskSize(MIB, 10, 8 * MIB))
    spare.make()
    (tmp_path / "taken" / "by something").mkdir(parents=True)
    assert spare.take(tmp_path / "taken") is False  # the caller makes the run's folder itself
    assert os.path.ismount(spare.path / "disk")
    spare.remove()
    assert disk_limits.mounted_under(tmp_path) == []


@needs_root
def test_a_spare_run_folder_left_half_made_or_mounted_by_a_killed_runner_is_removed(tmp_path):
    size = DiskSize(MIB, 10, 8 * MIB)
    for left in ("spare-run", "spare-run.new"):
        (tmp_path / left).mkdir()
        disk_limits.mount(tmp_path / left / "disk.img", tmp_path / left / "disk", size)
    SpareRunFolder(tmp_path / "spare-run", size).remove()
    assert list(tmp_path.iterdir()) == [] and disk_limits.mounted_under(tmp_path) == []


def test_a_run_begun_before_disk_limits_keeps_its_output_where_its_container_writes(tmp_path):
    new = RunFolder.create(tmp_path / "runs", claim_of_run(7))
    assert new.output_dir == new.path / "disk" / "output" and not new.older_layout
    (new.path / "output").mkdir()  # as a runner from before disk limits left it
    older = RunFolder.load(new.path)
    assert older.older_layout and older.output_dir == new.path / "output"
    assert older.pytaskmanager_log == new.path / "pytaskmanager-log.txt"


@needs_root
def test_sizing_after_a_runner_killed_while_sizing_finds_its_way(tmp_path):
    left = DiskSize(MIB, 10, 8 * MIB)
    (tmp_path / "check").mkdir()
    disk_limits.mount(tmp_path / "check" / "disk.img", tmp_path / "check" / "mounted", left)  # as a kill left it
    assert disk_limits.calibrate(tmp_path / "check", MIB, 10).max_bytes == MIB
    assert disk_limits.mounted_under(tmp_path) == []


def test_a_folder_a_worker_removes_is_left_to_it_by_the_look_for_left_overs(tmp_path):
    runs = tmp_path / "runs"
    going, left_over, unfinished = (RunFolder.create(runs, claim_of_run(run_id)) for run_id in (7, 8, 9))
    for folder in (going, left_over):
        (folder.path / "state.json").unlink()  # as removing a folder begins, and as a killed runner may leave it
    assert [folder.run_id for folder in unfinished_runs(runs, busy={7})] == [9]
    assert going.path.exists() and not left_over.path.exists()
