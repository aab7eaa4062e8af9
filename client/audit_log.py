"""The site's audit log: what ran at this site, in an order that cannot be changed unseen.

    work_dir/audit.jsonl        one entry a line, oldest first; only ever appended to
    work_dir/audit.jsonl.head   {"seq": n, "sha256": the last line's}, replaced after each append
    work_dir/audit.jsonl.lock   held (flock) by whoever appends: the runner's threads, the IT officer's CLI

An entry is one JSON object of plain ASCII, its keys in this order:

    {"seq":12,"at":1796336096.0,"event":"container_ended","run":7,"exit_code":0,...,"prev":"<64 hex>"}

seq counts 1, 2, 3...; at is the appender's clock; run is the run's id or null; then the caller's
fields; prev is the sha256 of the previous line's exact bytes (GENESIS for the first). Field values
come from outside (a registry, an algorithm): they are written escaped (ensure_ascii), so no value,
whatever it holds, can end a line or forge another entry.

Each entry names its predecessor, and the head names the last entry, so an entry edited, removed,
moved or inserted breaks the chain, and entries cut from the end disagree with the head; verify()
says at which line. The chain carries no secret: someone who can rewrite the whole file and its head
can rewrite history, so the log shows tampering by hand and accident, not by a determined
administrator (copy the head elsewhere to anchor it).

An append holds the lock, checks that the log ends where its head says, writes its line with one
write to the end, syncs it to disk and only then replaces the head. A log whose end is not a
complete entry, or disagrees with its head, is appended to no more (AuditLogBroken): chaining onto
it would hide what happened to it.
"""

import fcntl
import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.printable import printable

GENESIS = "0" * 64
RESERVED = ("seq", "at", "event", "run", "prev")
SHOWN_LENGTH = 200
_CHUNK = 64 * 1024
_HEX = frozenset("0123456789abcdef")
FIX = "run `runScript.py audit verify`; to start a new log, move it and its .head aside"


class AuditLogBroken(Exception):
    """The log's end is not what its appenders left; nothing is appended until a person has looked."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int  # entries read and found in order, up to the problem if there is one
    problem: str | None = None
    # The line of the first broken entry; for entries missing from the end, the line the first of them held.
    line: int | None = None


@dataclass(frozen=True)
class Head:
    seq: int
    sha256: str


class AuditLog:
    def __init__(self, path, clock=time.time):
        self.path = Path(path)
        self.head_path = Path(f"{path}.head")
        self.lock_path = Path(f"{path}.lock")
        self._clock = clock
        # flock holds off other processes (and other AuditLogs of this file); this holds off this one's threads.
        self._lock = threading.Lock()

    def append(self, event, run=None, **fields):
        """Write one entry and return it. Raises TypeError for a reserved field name, TypeError or ValueError
        for a value JSON cannot hold (an object, NaN), AuditLogBroken if the log's end is not as its appenders
        left it."""
        check_entry(event, run, fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, _holding(self.lock_path):
            log_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                seq, prev = self._end(log_fd)
                entry = {"seq": seq + 1, "at": self._clock(), "event": event, "run": run, **fields, "prev": prev}
                line = serialise(entry)
                size = os.fstat(log_fd).st_size
                written = os.write(log_fd, line + b"\n")
                if written != len(line) + 1:
                    os.ftruncate(log_fd, size)  # a partial line would stop every later append
                    raise OSError(f"{self.path}: only {written} of {len(line) + 1} bytes of an entry were written "
                                  "(is the disk full?); the entry was taken back")
                os.fsync(log_fd)
            finally:
                os.close(log_fd)
            _write_head(self.head_path, entry["seq"], sha256(line))
        return entry

    def _end(self, log_fd):
        """The last entry's (seq, sha256): what the next entry follows."""
        try:
            head = read_head(self.head_path)
            last = _last_line(log_fd)
        except ValueError as error:
            raise self._broken(error) from None
        if last is None:
            if head is None:
                # A head before the first entry, so that a crash right after it leaves the head one entry
                # behind, as after any other entry; an absent head then always means a head removed.
                _write_head(self.head_path, 0, GENESIS)
            elif head != Head(0, GENESIS):
                raise self._broken(f"the log is empty but its head says seq {head.seq}")
            return 0, GENESIS
        entry, why = parse_entry(last)
        if why:
            raise self._broken(f"its last line is {why}")
        last_sha = sha256(last)
        mismatch = end_problem(head, entry["seq"], last_sha, entry["prev"], self.head_path)
        if mismatch:
            raise self._broken(mismatch[0])
        return entry["seq"], last_sha

    def _broken(self, why):
        return AuditLogBroken(f"{self.path}: {why}; nothing more is appended to it until that is looked at: {FIX}")


def check_entry(event, run, fields):
    """Raises TypeError for what cannot go into an entry as given."""
    reserved = [name for name in fields if name in RESERVED]
    if reserved:
        raise TypeError(f"audit log fields may not be named {', '.join(reserved)}: the log sets "
                        f"{', '.join(RESERVED)} itself; pass the value under another name")
    if not isinstance(event, str):
        raise TypeError(f"an audit log event is a str, not {type(event).__name__}")
    if run is not None and (isinstance(run, bool) or not isinstance(run, int)):
        raise TypeError(f"an audit log entry's run is an int run id or None, not {type(run).__name__}")


def serialise(entry):
    """One line of plain ASCII, without its newline: escaped, no value can end it."""
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def sha256(line):
    return hashlib.sha256(line).hexdigest()


def parse_entry(line):
    """(entry, None) for a line (bytes, without its newline) that is an entry as append writes it, else
    (None, why not)."""
    try:
        entry = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "not a JSON entry"
    if not isinstance(entry, dict) or list(entry)[:4] != list(RESERVED[:4]) or list(entry)[-1] != "prev":
        return None, "not an audit entry (its keys are not seq, at, event, run, ..., prev)"
    if not _is_int(entry["seq"]) or entry["seq"] < 1:
        return None, "not an audit entry (its seq is not a whole number from 1)"
    if not isinstance(entry["at"], (int, float)) or isinstance(entry["at"], bool):
        return None, "not an audit entry (its at is not a time)"
    if not isinstance(entry["event"], str):
        return None, "not an audit entry (its event is not a string)"
    if entry["run"] is not None and not _is_int(entry["run"]):
        return None, "not an audit entry (its run is neither a run id nor null)"
    if not _is_sha256(entry["prev"]):
        return None, "not an audit entry (its prev is not a sha256)"
    return entry, None


def read_head(head_path):
    """The head, or None if there is none. Raises ValueError if the file is not a head."""
    try:
        text = Path(head_path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        head = json.loads(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        head = None
    if (not isinstance(head, dict) or set(head) != {"seq", "sha256"} or not _is_int(head["seq"]) or head["seq"] < 0
            or not _is_sha256(head["sha256"])):
        raise ValueError(f"{head_path} is not a head ({{\"seq\": n, \"sha256\": hex}}): its end cannot be checked")
    return Head(head["seq"], head["sha256"])


def end_problem(head, last_seq, last_sha, before_last_sha, head_path):
    """(why, line) if a log whose entries, in order, end at last_seq disagrees with its head, else None.
    before_last_sha is the sha256 of the entry before the last one (its prev)."""
    if head is None:
        if last_seq == 0:
            return None
        return f"{head_path} is missing: entries removed from the log's end would go unseen", None
    if head.seq == last_seq and head.sha256 == last_sha:
        return None
    # Not tampering: an append that stopped between writing its entry and replacing the head (a crash, a
    # power cut) leaves the head exactly one entry behind, naming the entry that the last one follows. The
    # next append carries on from the last entry and brings the head up to it. Until then the last entry is
    # held only by its own prev.
    if head.seq == last_seq - 1 and head.sha256 == before_last_sha:
        return None
    if head.seq > last_seq:
        return (f"the log ends at seq {last_seq} but its head says seq {head.seq} "
                "(entries were removed from its end)", last_seq + 1)
    if head.seq == last_seq:
        return f"line {last_seq} was changed: its sha256 is not the one in the head", last_seq
    return (f"its head says seq {head.seq} (sha256 {head.sha256[:12]}...) but the log goes on to seq {last_seq} "
            "with another entry there (the head or the log was replaced)"), None


def verify(path):
    """Whether the log at path is whole: every entry in order, each naming the one before, and its end where the
    head says. Reads one line at a time; stops at the first problem."""
    path = Path(path)
    head_path = Path(f"{path}.head")
    try:
        with _holding(Path(f"{path}.lock"), shared=True):
            # Appends only add to the end, so the first `size` bytes hold still while they are read below, and
            # agree with the head read together with them.
            size = path.stat().st_size
            head = read_head(head_path)
    except FileNotFoundError:
        return Verdict(False, 0, f"no audit log at {path}")
    except ValueError as error:
        return Verdict(False, 0, str(error))
    last_seq, last_sha, before_last_sha = 0, GENESIS, None
    with open(path, "rb") as log_file:
        for number, line in enumerate(_lines(log_file, size), 1):
            problem = line_problem(number, line, last_seq, last_sha)
            if problem:
                return Verdict(False, last_seq, problem, number)
            last_seq, last_sha, before_last_sha = last_seq + 1, sha256(line[:-1]), last_sha
    mismatch = end_problem(head, last_seq, last_sha, before_last_sha, head_path)
    if mismatch:
        return Verdict(False, last_seq, *mismatch)
    return Verdict(True, last_seq)


def line_problem(number, line, last_seq, last_sha):
    """Why line `number` (bytes, with its newline) does not follow an entry seq last_seq whose sha256 is last_sha,
    or None."""
    if not line.endswith(b"\n"):
        return f"line {number} is cut short: no newline at its end (a write was interrupted, or the file cut)"
    entry, why = parse_entry(line[:-1])
    if why:
        return f"line {number}: {why}"
    seq = entry["seq"]
    if seq != last_seq + 1:
        if number == 1:
            return f"line 1: the log starts at seq {seq}, not 1 (entries were removed from its beginning)"
        cause = "an entry was removed, or moved" if seq > last_seq else "an entry was moved, or copied"
        return f"line {number}: seq {seq} follows seq {last_seq} ({cause})"
    if entry["prev"] != last_sha:
        if number == 1:
            return "line 1: its prev is not GENESIS, as the first entry's is (entries were removed from the beginning)"
        return (f"line {number}: its prev is not the sha256 of line {number - 1} "
                f"(line {number - 1} was edited, or an entry was removed or moved)")
    return None


def entries_of_run(path, run_id):
    """The entries whose run is run_id, oldest first; none if there is no log. Whether to trust them is
    verify's to say. Raises AuditLogBroken at a line that is not an entry."""
    return [entry for entry in read_entries(path) if _is_int(entry["run"]) and entry["run"] == run_id]


def read_entries(path):
    """Every entry, oldest first, read a line at a time; none if there is no log. Raises AuditLogBroken at a
    line that is not an entry."""
    try:
        log_file = open(path, "rb")
    except FileNotFoundError:
        return
    with log_file:
        for number, line in enumerate(log_file, 1):
            entry, why = parse_entry(line.rstrip(b"\n"))
            if why:
                raise AuditLogBroken(f"{path}: line {number} is {why}: {FIX}")
            yield entry


def describe(entry):
    """One line for a terminal: '2026-12-03 22:14:56Z #12 run 7 container_ended exit_code=0 reason=None'.
    Printable ASCII only, each value cut short."""
    at = entry.get("at")
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
    except (TypeError, ValueError, OverflowError, OSError):
        when = _shown(at)
    words = [when, "#" + _shown(entry.get("seq"))]
    if entry.get("run") is not None:
        words.append("run " + _shown(entry["run"]))
    words.append(_shown(entry.get("event")))
    words += [f"{_shown(name)}={_shown(value)}" for name, value in entry.items() if name not in RESERVED]
    return " ".join(words)


def _shown(value):
    text = str(value)
    if len(text) > SHOWN_LENGTH:
        text = text[:SHOWN_LENGTH - 3] + "..."
    return printable(text)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value):
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


@contextmanager
def _holding(lock_path, shared=False):
    """The log's lock, for the block. A reader goes on without it if there is no lock file (no appender yet)."""
    flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(lock_path, flags | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        if not shared:
            raise
        fd = None
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _last_line(log_fd):
    """The log's last line without its newline, read backwards from the end; None if the log is empty.
    Raises ValueError if the log does not end with a newline."""
    size = os.fstat(log_fd).st_size
    if size == 0:
        return None
    if os.pread(log_fd, 1, size - 1) != b"\n":
        raise ValueError("its last line is cut short: no newline at its end (a write was interrupted)")
    pieces = []
    start = size - 1
    while start > 0:
        step = min(_CHUNK, start)
        piece = os.pread(log_fd, step, start - step)
        cut = piece.rfind(b"\n")
        if cut >= 0:
            pieces.append(piece[cut + 1:])
            break
        pieces.append(piece)
        start -= step
    return b"".join(reversed(pieces))


def _lines(log_file, size):
    """The file's lines, with their newlines, up to byte `size`."""
    remaining = size
    while remaining > 0:
        line = log_file.readline(remaining)
        if not line:  # the file was cut while being read
            return
        remaining -= len(line)
        yield line


def _write_head(head_path, seq, sha):
    temporary = Path(f"{head_path}.new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps({"seq": seq, "sha256": sha}).encode("ascii"))
        os.fsync(fd)  # else a power cut could leave an empty head behind the rename
    finally:
        os.close(fd)
    os.replace(temporary, head_path)
    folder = os.open(head_path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(folder)  # the rename, and on the first append the log's own name
    finally:
        os.close(folder)
