"""The site's airlock: checks on an algorithm's /output before anything of it leaves the site.

The runner calls veto_reason after the container has ended and before it packs the output, so
nothing changes the folder meanwhile. The checks, in order, stop at the first refusal:
    every regular file is at most max_file_bytes → its name ends in one of allowed_suffixes
    (case-insensitively) → the site's check command, if it has one, exits 0.

The algorithm is hostile, the site's settings and its command are trusted. So:
- The folder is walked with a list of folders still to read, not by recursion, so a deep tree
  cannot exhaust the stack, and without following links: a link to /etc/passwd is a link, listed
  as such and never read. Links and special files (FIFOs, devices, sockets) are never opened; the
  packer leaves them out of the upload, so they pass the file checks. A folder that cannot be read
  (no permission, a path longer than the system allows) is refused: what the airlock cannot see
  does not leave.
- A file name is any bytes: in a reason or on the IT officer's terminal it is shown printable and
  cut short, so a newline cannot forge a log line nor an escape sequence rewrite the screen.
- The check command runs without a shell, the output folder as its last argument, the run's ids
  from the registry (which may be compromised too) in PHT_* environment variables as plain text.
  It runs in a session of its own; at its timeout, and in any case once it has ended, its whole
  process group is killed, so nothing it forked lingers. Of what it prints, only the first
  64 KiB of each stream is kept; the rest is read and dropped, so it never blocks on a full pipe.
"""

import os
import selectors
import signal
import stat
import subprocess
import time
from dataclasses import dataclass

from client.output_archive import OutputUnreadable, shown_path, walk_output
from common.printable import printable

MAX_COMMAND_LINE_CHARS = 500  # of the check command's line in a reason
MAX_COMMAND_OUTPUT_BYTES = 64 * 1024  # kept of each of the check command's streams
READ_CHUNK_BYTES = 64 * 1024
REFUSED = "the site's airlock refused the output: "
RUN_INFO_VARIABLES = {"run_id": "PHT_RUN_ID", "task_id": "PHT_TASK_ID", "researcher": "PHT_RESEARCHER",
                      "image_digest": "PHT_IMAGE_DIGEST"}


@dataclass(frozen=True)
class AirlockChecks:
    max_file_bytes: int | None = None  # the largest single output file allowed; None: any size
    allowed_suffixes: tuple[str, ...] | None = None  # e.g. (".csv", ".json"), any case; None: any name
    check_command: tuple[str, ...] | None = None  # the site's veto hook, argv without a shell; None: none
    check_timeout_seconds: int = 60

    def __post_init__(self):
        if self.max_file_bytes is not None and (not _whole(self.max_file_bytes) or self.max_file_bytes < 0):
            raise ValueError(f"airlock.max_file_bytes must be a whole number of bytes, 0 or more, "
                             f"not {self.max_file_bytes!r}")
        for suffix in self.allowed_suffixes or ():
            if not isinstance(suffix, str) or len(suffix) < 2 or not suffix.startswith("."):
                raise ValueError(f"airlock.allowed_suffixes: {suffix!r} must be a suffix with its dot, like '.csv'")
        if self.check_command is not None and (
                not self.check_command or not all(isinstance(arg, str) and arg for arg in self.check_command)):
            raise ValueError("airlock.check_command must be a list of non-empty strings, the program first, "
                             "like [\"/opt/site/check-output\", \"--strict\"]; leave it out for no command")
        if not _whole(self.check_timeout_seconds) or self.check_timeout_seconds < 1:
            raise ValueError(f"airlock.check_timeout_seconds must be a whole number of seconds, 1 or more, "
                             f"not {self.check_timeout_seconds!r}")


@dataclass(frozen=True)
class OutputFile:
    path: str  # relative to the output folder, posix; undecodable bytes as surrogate escapes (os.fsdecode)
    size: int  # bytes of a regular file; 0 for links and special files, which are not uploaded
    kind: str  # "file", "link" or "other"


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None  # None: it did not finish within its time; negative: ended by that signal
    stdout: bytes  # the start of what it printed, at most MAX_COMMAND_OUTPUT_BYTES
    stderr: bytes


def list_output(output_dir):
    """Everything below output_dir but its folders, as OutputFiles sorted by path; never follows links.

    Raises OutputUnreadable naming the first folder or entry that could not be read."""
    found = []
    for relative, info in walk_output(output_dir):
        if stat.S_ISREG(info.st_mode):
            found.append(OutputFile(relative, info.st_size, "file"))
        elif not stat.S_ISDIR(info.st_mode):
            found.append(OutputFile(relative, 0, "link" if stat.S_ISLNK(info.st_mode) else "other"))
    return sorted(found, key=lambda file: file.path)


@dataclass(frozen=True)
class Veto:
    """Why an output may not leave: reason for the researcher, detail for the site's logs. The reason names the
    rule but never a file: a name is the algorithm's to choose, and would leave the site in the reason."""
    reason: str
    detail: str


def veto(output_dir, checks, run_info):
    """None when the output may leave the site, else a Veto.

    run_info: the run's run_id, task_id, researcher and image_digest, for the check command."""
    try:
        files = list_output(output_dir)
    except OutputUnreadable as error:
        return Veto(REFUSED + "it cannot read all of the output", REFUSED + str(error))
    refusal = file_refusal(files, checks)
    if refusal is None and checks.check_command is not None:
        said = _command_veto(output_dir, checks, run_info)
        refusal = None if said is None else Veto(said, said)  # the site's own command's words
    return None if refusal is None else Veto(REFUSED + refusal.reason, REFUSED + refusal.detail)


def file_refusal(files, checks):
    """The first regular file that breaks the site's size or name rules, as a Veto, or None (pure)."""
    suffixes = tuple(suffix.lower() for suffix in checks.allowed_suffixes or ())
    for file in files:
        if file.kind != "file":
            continue  # not uploaded: the packer leaves links and special files out
        if checks.max_file_bytes is not None and file.size > checks.max_file_bytes:
            limit = f"over its limit of {checks.max_file_bytes} per file"
            return Veto(f"a file is {limit}", f"{shown_path(file.path)} is {file.size} bytes, {limit}")
        if checks.allowed_suffixes is not None and not _has_suffix(file.path, suffixes):
            types = f"not among the file types it lets out ({', '.join(checks.allowed_suffixes)})"
            return Veto(f"a file is {types}", f"{shown_path(file.path)} is {types}")
    return None


def command_reason(result, timeout_seconds):
    """Why the check command's result vetoes the output, or None when it passed (pure)."""
    if result.exit_code is None:
        return f"its check command did not finish within {timeout_seconds} s"
    if result.exit_code == 0:
        return None
    said = _first_line(result.stdout) or _first_line(result.stderr)
    if said is None:
        said = (f"it was ended by signal {-result.exit_code}" if result.exit_code < 0
                else f"exit code {result.exit_code}")
    return f"its check command refused it: {said}"


def command_environment(run_info):
    """(the check command's environment, None) or (None, why the run's ids cannot be passed in one)."""
    environment = dict(os.environ)
    for key, variable in RUN_INFO_VARIABLES.items():
        value = run_info.get(key)
        text = "" if value is None else str(value)
        try:
            if "\0" in text:
                raise ValueError("a NUL character")
            os.fsencode(text)
        except (ValueError, UnicodeError):
            return None, (f"its check command cannot be given the run's {key} {printable(repr(text))[:100]}: "
                          "it is not text an environment variable can hold")
        environment[variable] = text
    return environment, None


def run_check_command(argv, environment, timeout_seconds):
    """Run argv in a session of its own; a CommandResult once it and its streams have ended or its time is up.

    Its whole process group is killed before this returns. Raises OSError when it cannot start."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=environment, start_new_session=True)
    stdout, stderr = bytearray(), bytearray()
    kept = {process.stdout.fileno(): stdout, process.stderr.fileno(): stderr}
    try:
        finished = _read_until_ended(process.pid, kept, time.monotonic() + timeout_seconds)
    finally:
        # The leader is not reaped yet, so its pid, which names the group, cannot have been reused.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()
        process.stdout.close()
        process.stderr.close()
    return CommandResult(process.returncode if finished else None, bytes(stdout), bytes(stderr))


def describe_files(files):
    """Lines for the IT officer's terminal, like '   1234  results/table.csv' (pure)."""
    return [f"{file.size if file.kind == 'file' else file.kind:>7}  {shown_path(file.path)}" for file in files]


def _command_veto(output_dir, checks, run_info):
    environment, problem = command_environment(run_info)
    if problem:
        return problem
    try:
        result = run_check_command([*checks.check_command, os.fsdecode(output_dir)], environment,
                                   checks.check_timeout_seconds)
    except OSError as error:
        return f"its check command could not run: {printable(str(error))}; fix the site's airlock.check_command"
    return command_reason(result, checks.check_timeout_seconds)


def _read_until_ended(pid, kept, deadline):
    """Read the process's streams into kept (each up to its cap) until it has exited and they are closed.
    False when the deadline came first."""
    exited = os.pidfd_open(pid)  # readable once the process has ended; waiting on it does not reap it
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(exited, selectors.EVENT_READ)
            for stream in kept:
                selector.register(stream, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for key, _events in selector.select(left):
                    chunk = b"" if key.fd == exited else os.read(key.fd, READ_CHUNK_BYTES)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    buffer = kept[key.fd]
                    buffer += chunk[:MAX_COMMAND_OUTPUT_BYTES - len(buffer)]
        return True
    finally:
        os.close(exited)


def _first_line(output):
    for line in output.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            text = printable(line.strip())
            return text if len(text) <= MAX_COMMAND_LINE_CHARS else text[:MAX_COMMAND_LINE_CHARS - 3] + "..."
    return None


def _has_suffix(path, suffixes):
    name = path.rsplit("/", 1)[-1].lower()
    # A name that is only the suffix (".csv") is a hidden file without a type, as pathlib sees it.
    return any(name.endswith(suffix) and len(name) > len(suffix) for suffix in suffixes)


def _whole(value):
    return isinstance(value, int) and not isinstance(value, bool)
