"""The site's airlock against a hostile algorithm's output folder, and the site's check command run for
real: small scripts written here, run by this test's Python."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from client.airlock_checks import (MAX_COMMAND_OUTPUT_BYTES, AirlockChecks, CommandResult, OutputFile,
                                   command_reason, describe_files, file_refusal, list_output, run_check_command,
                                   veto)

REFUSED = "the site's airlock refused the output: "
RUN_INFO = {"run_id": 7, "task_id": 5, "researcher": "alice; rm -rf / $(id)", "image_digest": "sha256:" + "ab" * 32}


def wait_until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def veto_reason(output_dir, checks, run_info):
    """What the site's logs say of a veto (it names the file), or None."""
    found = veto(output_dir, checks, run_info)
    return found and found.detail


def write(folder, relative, size=0):
    path = os.path.join(os.fsencode(folder), os.fsencode(relative) if isinstance(relative, str) else relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(b"x" * size)


def hook(tmp_path, body):
    """A check command: this Python running body, with sys.argv as the airlock gives it."""
    script = tmp_path / "hook.py"
    script.write_text(body)
    return (sys.executable, str(script))


@pytest.fixture
def output(tmp_path):
    folder = tmp_path / "output"
    folder.mkdir()
    yield folder
    # Some trees here are deeper than Python's shutil.rmtree (and so pytest's clean-up) can remove.
    subprocess.run(["rm", "-rf", str(folder)], check=True)


# --- the file checks ---------------------------------------------------------------------------

def test_a_file_at_the_size_limit_passes_one_byte_more_is_refused(output):
    write(output, "results/table.csv", 1000)
    assert veto_reason(output, AirlockChecks(max_file_bytes=1000), RUN_INFO) is None
    write(output, "results/big.bin", 1001)
    assert veto_reason(output, AirlockChecks(max_file_bytes=1000), RUN_INFO) == (
        REFUSED + "results/big.bin is 1001 bytes, over its limit of 1000 per file")


def test_suffixes_are_compared_without_case(output):
    write(output, "a/TABLE.CSV")
    write(output, "b.Json")
    assert veto_reason(output, AirlockChecks(allowed_suffixes=(".csv", ".json", ".txt")), RUN_INFO) is None


@pytest.mark.parametrize("name", ["data.parquet", "README", "csv", ".csv", "data.csv.exe", "data.csv "])
def test_other_file_types_are_refused(output, name):
    write(output, "fine.txt")
    write(output, name)
    assert veto_reason(output, AirlockChecks(allowed_suffixes=(".csv", ".json", ".txt")), RUN_INFO) == (
        REFUSED + f"{name} is not among the file types it lets out (.csv, .json, .txt)")


def test_without_checks_everything_passes(output):
    write(output, "anything.bin", 10_000)
    assert veto_reason(output, AirlockChecks(), RUN_INFO) is None


def test_file_refusal_is_pure_and_skips_what_is_not_uploaded():
    checks = AirlockChecks(max_file_bytes=10, allowed_suffixes=(".csv",))
    assert file_refusal([OutputFile("x", 0, "link"), OutputFile("p", 0, "other"), OutputFile("a.csv", 10, "file")],
                        checks) is None
    refusal = file_refusal([OutputFile("a.csv", 11, "file")], checks)
    assert refusal.detail == "a.csv is 11 bytes, over its limit of 10 per file"


@pytest.mark.parametrize("checks, told", [
    (AirlockChecks(max_file_bytes=10), "a file is over its limit of 10 per file"),
    (AirlockChecks(allowed_suffixes=(".csv",)), "a file is not among the file types it lets out (.csv)"),
])
def test_the_researcher_is_told_the_rule_never_a_file_name(output, checks, told):
    """A name is the algorithm's to choose: in a reason, it would leave the site without anyone's review."""
    name = "patient 12 born 1961-04-02.bin"
    write(output, name, 11)
    found = veto(output, checks, RUN_INFO)
    assert found.reason == REFUSED + told
    assert name in found.detail and "1961" not in found.reason


def test_links_and_special_files_are_listed_never_followed_nor_opened(output):
    write(output, "results/table.csv", 5)
    os.symlink("/etc/passwd", output / "results" / "passwd.csv")
    os.symlink("/", output / "root")
    os.mkfifo(output / "pipe.csv")  # opening it would block until someone writes
    assert list_output(output) == [OutputFile("pipe.csv", 0, "other"), OutputFile("results/passwd.csv", 0, "link"),
                                   OutputFile("results/table.csv", 5, "file"), OutputFile("root", 0, "link")]
    answer = []
    checking = threading.Thread(target=lambda: answer.append(veto_reason(
        output, AirlockChecks(max_file_bytes=5, allowed_suffixes=(".csv",)), RUN_INFO)), daemon=True)
    checking.start()
    checking.join(timeout=30)
    assert answer == [None], "the airlock blocked on the FIFO, or refused a link or the FIFO"
    assert describe_files(list_output(output)) == [
        "  other  pipe.csv", "   link  results/passwd.csv", "      5  results/table.csv", "   link  root"]


def test_hostile_names_are_printable_in_reasons_and_listings(output):
    names = [b"evil\n[site runner] all fine\x1b[2J.bin", b"caf\xe9\xff.bin"]
    for name in names:
        write(output, name, 3)
    listed = list_output(output)
    assert [os.fsencode(file.path) for file in listed] == sorted(names)
    lines = describe_files(listed)
    assert lines == ["      3  caf??.bin", "      3  evil?[site runner] all fine?[2J.bin"]
    checks = AirlockChecks(allowed_suffixes=(".csv",))
    assert veto_reason(output, checks, RUN_INFO) == REFUSED + "caf??.bin is not among the file types it lets out (.csv)"
    os.remove(os.path.join(os.fsencode(output), names[1]))
    reason = veto_reason(output, checks, RUN_INFO)
    assert reason == REFUSED + "evil?[site runner] all fine?[2J.bin is not among the file types it lets out (.csv)"
    assert all(" " <= char <= "~" for char in reason + "".join(lines))


def test_long_names_are_cut_short(output):
    path = "/".join(["d" * 250] * 3) + "/x.bin"
    write(output, path, 1)
    reason = veto_reason(output, AirlockChecks(max_file_bytes=0), RUN_INFO)
    assert reason == REFUSED + "d" * 197 + "... is 1 bytes, over its limit of 0 per file"
    [line] = describe_files(list_output(output))
    assert line == "      1  " + "d" * 197 + "..."


def test_twenty_thousand_files_deeper_than_the_recursion_limit_are_listed(output):
    depth, per_folder = 1250, 16  # 1250 nested folders: recursion would stop near 1000
    assert depth > sys.getrecursionlimit()
    folder = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    for _level in range(depth):
        for number in range(per_folder):
            os.close(os.open(f"f{number}.csv", os.O_WRONLY | os.O_CREAT, dir_fd=folder))
        os.mkdir("d", dir_fd=folder)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=folder)
        os.close(folder)
        folder = inner
    os.close(folder)
    listed = list_output(output)
    assert len(listed) == depth * per_folder == 20_000
    assert {file.kind for file in listed} == {"file"}
    assert "d/" * (depth - 1) + "f15.csv" in {file.path for file in listed}
    assert veto_reason(output, AirlockChecks(allowed_suffixes=(".csv",)), RUN_INFO) is None


def test_a_tree_deeper_than_the_systems_path_limit_is_refused_not_crashed(output):
    folder = os.open(output, os.O_RDONLY | os.O_DIRECTORY)
    for _level in range(2100):  # "d/" * 2100 is longer than PATH_MAX (4096)
        os.mkdir("d", dir_fd=folder)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=folder)
        os.close(folder)
        folder = inner
    os.close(os.open("secret.bin", os.O_WRONLY | os.O_CREAT, dir_fd=folder))
    os.close(folder)
    reason = veto_reason(output, AirlockChecks(), RUN_INFO)
    assert reason.startswith(REFUSED + "it cannot read the output's d/d/d/")
    assert reason.endswith("...: File name too long")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_it_cannot_read_is_refused(output):
    write(output, "locked/rows.csv", 1)
    os.chmod(output / "locked", 0)
    try:
        assert veto_reason(output, AirlockChecks(), RUN_INFO) == (
            REFUSED + "it cannot read the output's locked: Permission denied")
    finally:
        os.chmod(output / "locked", 0o700)


@pytest.mark.parametrize("settings, fix", [
    ({"allowed_suffixes": ("csv",)}, "like '.csv'"),
    ({"max_file_bytes": -1}, "0 or more"),
    ({"check_command": ()}, "leave it out for no command"),
    ({"check_timeout_seconds": 0}, "1 or more"),
])
def test_settings_that_cannot_work_are_refused_naming_the_fix(settings, fix):
    with pytest.raises(ValueError, match=fix):
        AirlockChecks(**settings)


# --- the site's check command --------------------------------------------------------------------

def test_the_check_command_gets_the_folder_last_and_the_run_in_its_environment(tmp_path, output):
    seen = tmp_path / "seen.json"
    command = hook(tmp_path, "import json, os, sys\n"
                             "json.dump({'argv': sys.argv[1:], 'stdin': sys.stdin.read(),"
                             " 'env': {k: os.environ.get(k) for k in ('PHT_RUN_ID', 'PHT_TASK_ID', 'PHT_RESEARCHER',"
                             " 'PHT_IMAGE_DIGEST')}},"
                             " open(sys.argv[1], 'w'))\n")
    assert veto_reason(output, AirlockChecks(check_command=(*command, str(seen))), RUN_INFO) is None
    assert json.loads(seen.read_text()) == {
        "argv": [str(seen), str(output)], "stdin": "",
        "env": {"PHT_RUN_ID": "7", "PHT_TASK_ID": "5", "PHT_RESEARCHER": "alice; rm -rf / $(id)",
                "PHT_IMAGE_DIGEST": "sha256:" + "ab" * 32}}


def test_a_veto_gives_the_commands_first_line(tmp_path, output):
    command = hook(tmp_path, "print('\\n   \\ncontains row-level data\\x1b[2J\\nsee rows 1-20'); raise SystemExit(1)")
    assert veto_reason(output, AirlockChecks(check_command=command), RUN_INFO) == (
        REFUSED + "its check command refused it: contains row-level data?[2J")


@pytest.mark.parametrize("result, said", [
    (CommandResult(1, b"", b"Traceback...\n"), "Traceback..."),
    (CommandResult(3, b" \n", b""), "exit code 3"),
    (CommandResult(-9, b"", b""), "it was ended by signal 9"),
])
def test_a_veto_without_words_on_stdout(result, said):
    assert command_reason(result, 60) == f"its check command refused it: {said}"


def test_the_command_runs_only_once_the_files_pass(tmp_path, output):
    write(output, "big.bin", 2)
    ran = tmp_path / "ran"
    command = hook(tmp_path, f"open({str(ran)!r}, 'w')")
    assert "big.bin is 2 bytes" in veto_reason(output, AirlockChecks(max_file_bytes=1, check_command=command),
                                               RUN_INFO)
    assert not ran.exists()


def test_a_command_that_forks_and_sleeps_is_killed_with_its_child_at_its_timeout(tmp_path, output):
    pid_file = tmp_path / "child.pid"
    command = hook(tmp_path, "import os, sys, time\n"
                             "child = os.fork()\n"
                             "if child:\n"
                             f"    open({str(pid_file) + '.partial'!r}, 'w').write(str(child))\n"
                             f"    os.rename({str(pid_file) + '.partial'!r}, {str(pid_file)!r})\n"
                             "print('still thinking', flush=True)\n"
                             "while True:\n"
                             "    time.sleep(3600)\n")
    answer = []
    started = time.monotonic()
    checking = threading.Thread(target=lambda: answer.append(veto_reason(
        output, AirlockChecks(check_command=command, check_timeout_seconds=3), RUN_INFO)), daemon=True)
    checking.start()
    wait_until(pid_file.exists, "the check command wrote its child's pid")
    child = int(pid_file.read_text())
    assert not gone(child)
    checking.join(timeout=30)
    took = time.monotonic() - started
    assert answer == [REFUSED + "its check command did not finish within 3 s"]
    assert 3 <= took < 15
    wait_until(lambda: gone(child), f"the check command's child {child} is gone")


def test_a_command_that_prints_10_mb_is_read_to_its_end_but_kept_short(tmp_path, output):
    command = hook(tmp_path, "import sys\n"
                             "sys.stdout.write('x' * 10_000_000)\n"
                             "sys.stderr.write('y' * 10_000_000)\n"
                             "raise SystemExit(4)\n")
    result = run_check_command([*command, str(output)], dict(os.environ), 60)
    assert result == CommandResult(4, b"x" * MAX_COMMAND_OUTPUT_BYTES, b"y" * MAX_COMMAND_OUTPUT_BYTES)
    reason = veto_reason(output, AirlockChecks(check_command=command), RUN_INFO)
    assert reason == REFUSED + "its check command refused it: " + "x" * 497 + "..."


def test_a_command_that_does_not_exist_names_the_fix(tmp_path, output):
    missing = str(tmp_path / "no-such-check")
    assert veto_reason(output, AirlockChecks(check_command=(missing,)), RUN_INFO) == (
        REFUSED + f"its check command could not run: [Errno 2] No such file or directory: '{missing}'; "
        "fix the site's airlock.check_command")


@pytest.mark.parametrize("researcher", ["alice\0", "\ud800"])
def test_run_info_an_environment_cannot_hold_is_refused_not_crashed(tmp_path, output, researcher):
    ran = tmp_path / "ran"
    command = hook(tmp_path, f"open({str(ran)!r}, 'w')")
    reason = veto_reason(output, AirlockChecks(check_command=command), {**RUN_INFO, "researcher": researcher})
    assert reason.startswith(REFUSED + "its check command cannot be given the run's researcher ")
    assert not ran.exists()


def gone(pid):
    """Whether the process has ended: no such process, or one only waiting to be reaped (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
