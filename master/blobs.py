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
        digest = hashlib.sha256()
        size = 0
        fd, temp_name = tempfile.mkstemp(dir=self._incoming)
        try:
            with os.fdopen(fd, "wb") as temp:
                while chunk := stream.read(CHUNK_SIZE):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLarge(f"upload is larger than the limit of {max_bytes} bytes")
                    digest.update(chunk)
                    temp.write(chunk)
                temp.flush()
                os.fsync(temp.fileno())
            actual = digest.hexdigest()
            if actual != declared_sha256:
                raise ChecksumMismatch(
                    f"the upload's sha256 is {actual}, but the request declared {declared_sha256}")
            final = self.path_of(actual)
            final.parent.mkdir(exist_ok=True)
            os.replace(temp_name, final)
            return size
        finally:
            if os.path.exists(temp_name):
                os.unlink(temp_name)
