"""Folders and files that hold what only the service itself may read: task inputs, results, token
hashes, private keys. Made 0700 and 0600 whatever the umask, and made so again when found wider."""

import os
from pathlib import Path


def private_folder(path):
    """The folder at path, created with its parents if missing, readable by its owner only."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def private_file(path):
    """The file at path, created empty if missing, readable by its owner only. SQLite gives its -wal and
    -shm files the database file's mode, so doing this before the database is first opened covers them."""
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chmod(path, 0o600)
    return Path(path)
