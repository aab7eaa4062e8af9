"""What the FileService keeps on disk: its age key pair, who may call it, and the received files.

    DATA_DIR/identity.txt             the service's private age key (created once, readable by its owner only)
    DATA_DIR/tokens.json              sha256 of each caller's token, with its name and role (sender or operator)
    DATA_DIR/files/SENDER/TASK/NAME   received files, as sent: encrypted to the service's public key
    DATA_DIR/files/SENDER/NAME        the same, from a site runner that names no task (as every runner did before)

TASK is the registry's number of the task whose run sent the file: two tasks' algorithms that write one name
reach the service as two files, not as a conflict found after the second container ran. A received file is
named below its sender's folder, as TASK/NAME or NAME (a ReceivedName): list-files shows that name, export,
delete and the download URL take it, so there is no second spelling to learn.

A file is streamed to a temporary file while hashing and takes its name only once it is
complete and its sha256 matches what the sender declared: nobody ever reads half a file
(master/blobs.py's receive_stream, which the registry's result uploads use too).
"""

import hashlib
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass

import pyrage

from common import names
from common.private_files import private_folder
from master.blobs import ChecksumMismatch, TooLarge, receive_stream, sha256_of

SENDER = "sender"
OPERATOR = "operator"


class Refused(Exception):
    """The request breaks a rule; status is the HTTP status that says which kind."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def check_file_name(name):
    """Pure: the reason a file name is refused, or None."""
    if not names.is_file_name(name):
        return f"{name!r} is not an acceptable file name: use {names.FILE_NAME_RULE}"
    return None


# [0-9], not \d, which would take other scripts' digits too; no sign, no leading zero: one spelling per task.
TASK_ID = re.compile(r"[1-9][0-9]{0,17}")
TASK_ID_RULE = "the task's number: digits only, from 1, without leading zeros, at most 18 digits"


def task_id_problem(task):
    """Pure: the reason a task id (text from a request) is refused, or None."""
    if isinstance(task, str) and TASK_ID.fullmatch(task):
        return None
    return f"{task!r} is not a task id: use {TASK_ID_RULE}"


@dataclass(frozen=True)
class ReceivedName:
    """A received file's name below its sender's folder: TASK/FILE, or FILE alone (task None) for a file from a
    site runner that names no task."""
    task: int | None
    file: str

    def __str__(self):
        return self.file if self.task is None else f"{self.task}/{self.file}"

    def parts(self):
        """Its path below the sender's folder, one component each."""
        return (self.file,) if self.task is None else (str(self.task), self.file)


def parse_received_name(text):
    """Pure: the ReceivedName that text spells (as list-files shows it), or None if it spells none."""
    if not isinstance(text, str):
        return None
    task, slash, file = text.rpartition("/")
    if check_file_name(file) or (slash and task_id_problem(task)):
        return None
    return ReceivedName(int(task) if slash else None, file)


def _no_such_file(sender, name):
    return Refused(404, f"no file {name!r} from {sender!r}: give the sender and name as list-files shows them")


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


class Inbox:
    def __init__(self, data_dir):
        # Received files, the service's private key and its token hashes: the service's own.
        self.data_dir = private_folder(data_dir)
        self.files = self.data_dir / "files"
        self._incoming = self.data_dir / "incoming"
        self._tokens_file = self.data_dir / "tokens.json"
        for folder in (self.files, self._incoming):
            folder.mkdir(parents=True, exist_ok=True)
        self.identity = self._load_or_create_identity()

    @property
    def public_key(self):
        return str(self.identity.to_public())

    def _load_or_create_identity(self):
        path = self.data_dir / "identity.txt"
        if not path.exists():
            identity = pyrage.x25519.Identity.generate()
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as file:
                file.write(f"# public key: {identity.to_public()}\n{identity}\n")
        lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
        return pyrage.x25519.Identity.from_str(lines[0])

    # --- callers -----------------------------------------------------------

    def _tokens(self):
        if not self._tokens_file.exists():
            return {}
        return json.loads(self._tokens_file.read_text())

    def _save_tokens(self, tokens):
        descriptor, temp = tempfile.mkstemp(dir=self.data_dir)
        with os.fdopen(descriptor, "w") as file:
            json.dump(tokens, file, indent=2)
        os.replace(temp, self._tokens_file)

    def add_caller(self, name, role):
        tokens = self._tokens()
        if any(entry["name"] == name for entry in tokens.values()):
            raise Refused(409, f"{name!r} already has a token; revoke it first")
        if not names.is_file_name(name):
            raise Refused(400, f"{name!r} is not an acceptable name: use {names.FILE_NAME_RULE}")
        token = "pht_fs_" + secrets.token_urlsafe(32)
        tokens[token_hash(token)] = {"name": name, "role": role}
        self._save_tokens(tokens)
        return token

    def revoke_caller(self, name):
        tokens = self._tokens()
        kept = {h: entry for h, entry in tokens.items() if entry["name"] != name}
        if len(kept) == len(tokens):
            raise Refused(404, f"no caller is named {name!r}")
        self._save_tokens(kept)

    def caller_of(self, token):
        """(name, role) of a token's holder, or None."""
        entry = self._tokens().get(token_hash(token))
        return (entry["name"], entry["role"]) if entry else None

    # --- files ---------------------------------------------------------------

    def receive(self, sender, task, name, stream, declared_sha256, max_bytes):
        """Store a sender's file for a task (None: from a site runner that names none); returns (its
        ReceivedName, size, already_had_it). Refuses bad task ids, names, sizes and checksums."""
        problem = (task_id_problem(task) if task is not None else None) or check_file_name(name)
        if problem:
            raise Refused(400, problem)
        received = ReceivedName(None if task is None else int(task), name)
        final = self.files.joinpath(sender, *received.parts())
        try:
            temp, size = receive_stream(stream, self._incoming, declared_sha256, max_bytes)
        except TooLarge as error:
            raise Refused(413, str(error)) from None
        except ChecksumMismatch as error:
            raise Refused(400, str(error)) from None
        try:
            if final.exists():
                # The same file again is a retry (a runner restarted before it reported); other content is not.
                if final.is_file() and sha256_of(final) == declared_sha256:
                    return received, size, True
                raise Refused(409, f"{sender}/{received} exists already with other content")
            try:
                final.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                # Only a file from a runner that named no task can have a task folder's name.
                raise Refused(409, f"{sender}/{received.task} is a file received without a task, where task "
                                   f"{received.task}'s folder belongs: the TTP can export it, then delete it "
                                   f"(FileService.py delete {sender} {received.task})") from None
            os.replace(temp, final)
            return received, size, False
        finally:
            if temp.exists():
                temp.unlink()

    def listing(self):
        """Every received file: {sender, name (a ReceivedName's text), size}, by sender, task and name."""
        found = []
        for path in self.files.rglob("*"):
            sender, _, name = str(path.relative_to(self.files)).partition("/")
            received = parse_received_name(name)
            if received and not check_file_name(sender) and path.is_file():
                found.append((sender, received, path.stat().st_size))
        found.sort(key=lambda entry: (entry[0], entry[1].task or 0, entry[1].file))
        return [{"sender": sender, "name": str(received), "size": size} for sender, received, size in found]

    def path_of(self, sender, name):
        """The file list-files shows as SENDER and NAME; nothing else, so no name leads out of the inbox."""
        received = parse_received_name(name)
        path = self.files.joinpath(sender, *received.parts()) if received and not check_file_name(sender) else None
        if path is None or not path.is_file():
            raise _no_such_file(sender, name)
        return path

    def delete(self, sender, name):
        """Remove a received file; returns its size. Its task's folder stays, even empty: an upload for that task
        may be between creating the folder and moving its file in."""
        path = self.path_of(sender, name)
        size = path.stat().st_size
        try:
            path.unlink()
        except FileNotFoundError:  # deleted meanwhile by another call
            raise _no_such_file(sender, name) from None
        return size

    def decrypt_to(self, sender, name, destination):
        pyrage.decrypt_file(str(self.path_of(sender, name)), str(destination), [self.identity])
