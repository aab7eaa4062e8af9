"""What the FileService keeps on disk: its age key pair, who may call it, and the received files.

    DATA_DIR/identity.txt        the service's private age key (created once, readable by its owner only)
    DATA_DIR/tokens.json         sha256 of each caller's token, with its name and role (sender or operator)
    DATA_DIR/files/SENDER/NAME   received files, as sent: encrypted to the service's public key

A file is streamed to a temporary file while hashing and takes its name only once it is
complete and its sha256 matches what the sender declared: nobody ever reads half a file
(master/blobs.py's receive_stream, which the registry's result uploads use too).
"""

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path

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

    def receive(self, sender, name, stream, declared_sha256, max_bytes):
        """Store a sender's file; returns (size, already_had_it). Refuses bad names, sizes, checksums."""
        problem = check_file_name(name)
        if problem:
            raise Refused(400, problem)
        final = self.files / sender / name
        try:
            temp, size = receive_stream(stream, self._incoming, declared_sha256, max_bytes)
        except TooLarge as error:
            raise Refused(413, str(error)) from None
        except ChecksumMismatch as error:
            raise Refused(400, str(error)) from None
        try:
            if final.exists():
                if sha256_of(final) == declared_sha256:
                    return size, True
                raise Refused(409, f"{sender}/{name} exists already with other content")
            final.parent.mkdir(exist_ok=True)
            os.replace(temp, final)
            return size, False
        finally:
            if temp.exists():
                temp.unlink()

    def listing(self):
        return [{"sender": path.parent.name, "name": path.name, "size": path.stat().st_size}
                for path in sorted(self.files.glob("*/*")) if path.is_file()]

    def path_of(self, sender, name):
        if check_file_name(sender) or check_file_name(name):
            raise Refused(404, f"no file {sender}/{name}")
        path = self.files / sender / name
        if not path.is_file():
            raise Refused(404, f"no file {sender}/{name}")
        return path

    def decrypt_to(self, sender, name, destination):
        pyrage.decrypt_file(str(self.path_of(sender, name)), str(destination), [self.identity])

