"""The audit log: a chain that verifies, every kind of tampering found at its line, a crash mid-append
forgiven, appends from threads and processes at once, hostile values kept on one line."""

import hashlib
import json
import multiprocessing
import stat
import threading

import pytest

from client.audit_log import GENESIS, AuditLog, AuditLogBroken, Verdict, describe, entries_of_run, verify

AT = 1796336096.0  # 2026-12-03 22:14:56 UTC
ENTRIES = 10


def sha256(line):
    return hashlib.sha256(line).hexdigest()


def written_log(path, count=ENTRIES):
    audit = AuditLog(path, clock=lambda: AT)
    for number in range(1, count + 1):
        audit.append("container_ended", run=number, exit_code=0, value=str(number))
    return audit


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


def test_a_chain_of_entries_verifies_and_reads_as_documented(tmp_path):
    path = tmp_path / "site" / "work" / "audit.jsonl"  # the folder is made on the first append
    audit = AuditLog(path, clock=lambda: AT)
    first = audit.append("runner_started", version="2.0")
    second = audit.append("container_ended", run=7, exit_code=0, reason=None)
    written_log(path, ENTRIES - 2)

    verdict = verify(path)
    assert (verdict.ok, verdict.entries, verdict.problem, verdict.line) == (True, ENTRIES, None, None)
    lines = lines_of(path)
    assert len(lines) == ENTRIES and all(line.endswith(b"\n") and line.isascii() for line in lines)
    assert lines[0] == (b'{"seq":1,"at":1796336096.0,"event":"runner_started","run":null,"version":"2.0","prev":"'
                        + GENESIS.encode() + b'"}\n')
    assert json.loads(lines[0]) == first and json.loads(lines[1]) == second
    assert list(second) == ["seq", "at", "event", "run", "exit_code", "reason", "prev"]
    for number, line in enumerate(lines[1:], 2):
        assert json.loads(line)["seq"] == number
        assert json.loads(line)["prev"] == sha256(lines[number - 2].rstrip(b"\n"))
    head = json.loads(audit.head_path.read_text())
    assert head == {"seq": ENTRIES, "sha256": sha256(lines[-1].rstrip(b"\n"))}
    for made in (path, audit.head_path, audit.lock_path):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600, made


def forged(seq, prev, **fields):
    return json.dumps({"seq": seq, "at": AT, "event": "container_ended", "run": seq, **fields, "prev": prev},
                      separators=(",", ":")).encode() + b"\n"


def edit_middle(lines):
    lines[4] = lines[4].replace(b'"value":"5"', b'"value":"6"')
    return lines


def edit_last(lines):
    lines[-1] = lines[-1].replace(b'"exit_code":0', b'"exit_code":1')
    return lines


def swap_3_and_4(lines):
    lines[2], lines[3] = lines[3], lines[2]
    return lines


def cut_mid_line(lines):
    return lines[:6] + [lines[6][:len(lines[6]) // 2]]


def insert_forged(lines):
    """A forger who copies the look of an entry but cannot say what came before."""
    return lines[:4] + [forged(5, "f" * 64, exit_code=0, value="5")] + lines[4:]


def insert_forged_with_its_prev(lines):
    """A forger who chains onto line 4: the entry that follows then repeats its seq."""
    return lines[:4] + [forged(5, sha256(lines[3].rstrip(b"\n")), exit_code=0)] + lines[4:]


def insert_garbage(lines):
    return lines[:4] + [b"rm -rf / ran here\n"] + lines[4:]


@pytest.mark.parametrize("tamper, line, problem", [
    (edit_middle, 6, "line 6: its prev is not the sha256 of line 5 (line 5 was edited"),
    (edit_last, 10, "line 10 was changed: its sha256 is not the one in the head"),
    (lambda lines: lines[:4] + lines[5:], 5, "line 5: seq 6 follows seq 4 (an entry was removed"),
    (lambda lines: lines[:-1], 10, "the log ends at seq 9 but its head says seq 10 (entries were removed from"),
    (swap_3_and_4, 3, "line 3: seq 4 follows seq 2"),
    (lambda lines: lines[:5], 6, "the log ends at seq 5 but its head says seq 10"),
    (lambda lines: [], 1, "the log ends at seq 0 but its head says seq 10"),
    (lambda lines: lines[2:], 1, "line 1: the log starts at seq 3, not 1"),
    (cut_mid_line, 7, "line 7 is cut short: no newline at its end"),
    (insert_forged, 5, "line 5: its prev is not the sha256 of line 4"),
    (insert_forged_with_its_prev, 6, "line 6: seq 5 follows seq 5"),
    (insert_garbage, 5, "line 5: not a JSON entry"),
])
def test_tampering_is_found_at_its_line(tmp_path, tamper, line, problem):
    path = tmp_path / "audit.jsonl"
    written_log(path)
    path.write_bytes(b"".join(tamper(lines_of(path))))
    verdict = verify(path)
    assert not verdict.ok and verdict.line == line and problem in verdict.problem, verdict


def test_a_log_without_its_head_or_without_itself_does_not_verify(tmp_path):
    path = tmp_path / "audit.jsonl"
    assert verify(path) == Verdict(False, 0, f"no audit log at {path}", None)
    audit = written_log(path)
    audit.head_path.unlink()
    assert not verify(path).ok and "audit.jsonl.head is missing" in verify(path).problem
    audit.head_path.write_text("")
    assert not verify(path).ok and "is not a head" in verify(path).problem


def test_a_head_two_entries_behind_does_not_verify(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 5)
    old_head = audit.head_path.read_bytes()
    written_log(path, 2)
    audit.head_path.write_bytes(old_head)
    verdict = verify(path)
    assert not verdict.ok and "its head says seq 5" in verdict.problem and "goes on to seq 7" in verdict.problem


def test_a_crash_between_append_and_head_update_verifies_and_the_chain_goes_on(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 5)
    head_before = audit.head_path.read_bytes()
    audit.append("container_started", run=6)
    audit.head_path.write_bytes(head_before)  # the head as the crash left it: one entry behind
    assert verify(path).ok and verify(path).entries == 6

    entry = audit.append("runner_started")
    assert entry["seq"] == 7 and entry["prev"] == sha256(lines_of(path)[5].rstrip(b"\n"))
    assert verify(path).ok and verify(path).entries == 7
    assert json.loads(audit.head_path.read_text())["seq"] == 7


def test_a_crash_after_the_first_entry_verifies_and_the_chain_goes_on(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 1)
    audit.head_path.write_text(json.dumps({"seq": 0, "sha256": GENESIS}))  # the head written before the first entry
    assert verify(path).ok and verify(path).entries == 1
    assert audit.append("runner_started")["seq"] == 2 and verify(path).ok


def append_many(path, who, count, start):
    start.wait(timeout=60)
    audit = AuditLog(path)
    for number in range(count):
        audit.append("appended", who=who, number=number)


def assert_whole_chain(path, writers, count):
    verdict = verify(path)
    assert verdict.ok and verdict.entries == writers * count, verdict
    entries = [json.loads(line) for line in lines_of(path)]
    assert [entry["seq"] for entry in entries] == list(range(1, writers * count + 1))
    for who in range(writers):
        assert [entry["number"] for entry in entries if entry["who"] == who] == list(range(count))


def test_appends_from_threads_at_once_make_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    shared = AuditLog(path)
    start = threading.Barrier(4)

    def append_50(who):
        start.wait(timeout=60)
        for number in range(50):
            shared.append("appended", who=who, number=number)

    threads = [threading.Thread(target=append_50, args=(who,)) for who in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "an appending thread did not finish within 60 s"
    assert_whole_chain(path, 4, 50)


def test_appends_from_processes_at_once_make_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(2)
    processes = [spawn.Process(target=append_many, args=(path, who, 50, start)) for who in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0, f"an appending process ended with {process.exitcode} (None: still running)"
    assert_whole_chain(path, 2, 50)


HOSTILE = {"newline": "ok\n{\"seq\":99}", "escape": "\x1b[2J\x1b[H", "huge": "x" * 100_000,
           "controls": "\x00\r\x7f\x85\u2028", "accents": "é€"}


def test_hostile_values_stay_on_their_line_and_print_as_plain_text(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, clock=lambda: AT)
    entry = audit.append("run_refused", run=3, **HOSTILE)
    after = audit.append("runner_started")  # chains onto a last line longer than one read from the end

    lines = lines_of(path)
    assert len(lines) == 2 and all(line.isascii() for line in lines)
    assert json.loads(lines[0]) == entry and {name: entry[name] for name in HOSTILE} == HOSTILE
    assert after["prev"] == sha256(lines[0].rstrip(b"\n")) and verify(path).ok
    shown = describe(entry)
    assert all(" " <= char <= "~" for char in shown), shown
    assert shown.startswith("2026-12-03 22:14:56Z #1 run 3 run_refused newline=ok?{\"seq\":99} escape=?[2J?[H ")
    assert "huge=" + "x" * 197 + "... " in shown and len(shown) < 1000


def test_describe_shows_one_line_as_documented(tmp_path):
    entry = {"seq": 12, "at": AT, "event": "container_ended", "run": 7, "exit_code": 0, "reason": None,
             "prev": GENESIS}
    assert describe(entry) == "2026-12-03 22:14:56Z #12 run 7 container_ended exit_code=0 reason=None"
    assert describe({**entry, "run": None}) == "2026-12-03 22:14:56Z #12 container_ended exit_code=0 reason=None"
    assert describe({**entry, "at": "\x1b[2J"}).startswith("?[2J #12")  # a time tampered with


def test_entries_of_run_are_that_runs_in_order(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    for run, step in [(1, "claimed"), (2, "claimed"), (1, "started"), (None, "runner_stopped"), (1, "ended")]:
        audit.append(step, run=run)
    assert [(entry["seq"], entry["event"]) for entry in entries_of_run(path, 1)] == [
        (1, "claimed"), (3, "started"), (5, "ended")]
    assert [entry["seq"] for entry in entries_of_run(path, 2)] == [2]
    assert entries_of_run(path, 3) == [] and entries_of_run(tmp_path / "none.jsonl", 1) == []


@pytest.mark.parametrize("name", ["seq", "at", "prev", "event"])
def test_reserved_field_names_are_refused(tmp_path, name):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 2)
    with pytest.raises(TypeError, match=name):
        audit.append("container_ended", run=1, **{name: 5})
    assert verify(path).entries == 2


def test_values_json_cannot_hold_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 2)
    for event, run, fields in [(b"bytes", None, {}), ("ended", "7", {}), ("ended", True, {}),
                               ("ended", 1, {"what": object()})]:
        with pytest.raises(TypeError):
            audit.append(event, run=run, **fields)
    with pytest.raises(ValueError):
        audit.append("ended", score=float("nan"))
    assert verify(path).ok and verify(path).entries == 2


def cut_last_line(path):
    path.write_bytes(path.read_bytes()[:-10])


def garbage_last_line(path):
    with open(path, "ab") as log_file:
        log_file.write(b"not an entry\n")


def remove_last_line(path):
    path.write_bytes(b"".join(lines_of(path)[:-1]))


def empty_the_log(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("breaking, why", [
    (cut_last_line, "its last line is cut short"),
    (garbage_last_line, "its last line is not a JSON entry"),
    (remove_last_line, "the log ends at seq 2 but its head says seq 3"),
    (empty_the_log, "the log is empty but its head says seq 3"),
    (lambda path: path.unlink(), "the log is empty but its head says seq 3"),
    (lambda path: path.with_name("audit.jsonl.head").unlink(), "audit.jsonl.head is missing"),
])
def test_append_after_a_broken_end_refuses_to_chain_onto_it(tmp_path, breaking, why):
    path = tmp_path / "audit.jsonl"
    audit = written_log(path, 3)
    breaking(path)
    before = path.read_bytes() if path.exists() else b""
    with pytest.raises(AuditLogBroken) as broken:
        audit.append("container_started", run=4)
    assert str(path) in str(broken.value) and why in str(broken.value)
    assert "run `runScript.py audit verify`" in str(broken.value)
    assert path.read_bytes() == before
