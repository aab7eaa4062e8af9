"""Result files on disk, addressed by their sha256.

Uploads are streamed to a temporary file while hashing, so a result of any size
never sits in memory; the file takes its final name only once it is complete and
its checksum matches what the sender declared. A reader therefore never sees a
partial blob, and storing the same content twice is naturally idempotent.
"""

import hashlib
import os
import tempfile
from pathlib import Path

CHUNK_SIZE = 1024 * 1024


class ChecksumMismatch(Exception):
    pass


class TooLarge(Exception):
    pass


class BlobStore:
    def __init__(self, root):
        self.root = Path(root)
        self._incoming = self.root / "incoming"
        self._incoming.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256):
        return self.root / sha256[:2] / sha256

    def store_stream(self, stream, declared_sha256, max_bytes):
        """Copy the stream to a blob; returns its size. Raises on a wrong checksum or over max_bytes."""
        temp, size = receive_stream(stream, self._incoming, declared_sha256, max_bytes)
        try:
            final = self.path_of(declared_sha256)
            final.parent.mkdir(exist_ok=True)
            os.replace(temp, final)
            return size
        finally:
            if temp.exists():
                temp.unlink()


def receive_stream(stream, incoming, declared_sha256, max_bytes):
    """Copy a stream to a new file in the folder incoming, hashing as it goes; returns (its path, size).

    Raises TooLarge past max_bytes and ChecksumMismatch when the sha256 is not the declared one,
    leaving nothing behind. The caller gives the file its final name (atomically) or deletes it.
    Shared by the registry's result uploads and the FileService.
    """
    digest = hashlib.sha256()
    size = 0
    descriptor, temp_name = tempfile.mkstemp(dir=incoming)
    try:
        with os.fdopen(descriptor, "wb") as temp:
            while chunk := stream.read(CHUNK_SIZE):
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"the upload is larger than the limit of {max_bytes} bytes")
                digest.update(chunk)
                temp.write(chunk)
            temp.flush()
            os.fsync(temp.fileno())
        if digest.hexdigest() != declared_sha256:
            raise ChecksumMismatch(
                f"the upload's sha256 is {digest.hexdigest()}, but the request declared {declared_sha256}")
        return Path(temp_name), size
    except BaseException:
        os.unlink(temp_name)
        raise


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()
