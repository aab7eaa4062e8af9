"""Result files (output archives and logs), addressed by their sha256, in one of two stores.

- FolderStore, the embedded default: a folder on the registry's disk (`<data-dir>/blobs`).
- S3Store: a bucket of an S3-compatible object store (AWS S3, MinIO, Ceph, SeaweedFS), shared by every
  replica of the registry, so that a result uploaded through one downloads through another.

Either way an upload is streamed to a temporary file on the replica's own disk while it is hashed, so a
result of any size never sits in memory, and it is stored only once it is complete and its checksum
matches what the sender declared: a reader never sees a partial blob, a wrong upload never replaces a
right one, and storing the same content twice is idempotent. Downloads are streamed from the store.

A blob the database lists but the store does not hold whole (deleted, truncated, a bucket emptied by
mistake) raises BlobMissing, which the API answers with a JSON 500 naming the run: never a traceback.
"""

import hashlib
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

CHUNK_SIZE = 1024 * 1024
# s3://bucket or s3://bucket/some/prefix: S3's rule for a bucket's name; a prefix's parts never empty or "..".
S3_LOCATION = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])"
                         r"(?:/(?P<prefix>(?!\.\.?(?:/|$))[A-Za-z0-9._-]+(?:/(?!\.\.?(?:/|$))[A-Za-z0-9._-]+)*))?/?")


class ChecksumMismatch(Exception):
    pass


class TooLarge(Exception):
    pass


class BlobMissing(Exception):
    """The store does not hold the blob the database lists, or holds one of another size."""


class StoreUnreachable(Exception):
    """The result store cannot be used at all (a bucket that does not exist, wrong credentials, no answer)."""


def incoming_folder(path):
    """The folder uploads are received in, emptied: what is in it was cut short by a stop or a crash."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.iterdir():
        leftover.unlink(missing_ok=True)
    return path


class FolderStore:
    """Blobs as files below root: root/ab/ab12… ."""

    def __init__(self, root):
        self.root = Path(root)
        self._incoming = incoming_folder(self.root / "incoming")

    def describe(self):
        return f"the folder {self.root}"

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
            temp.unlink(missing_ok=True)

    def open(self, sha256, size):
        """The blob as a binary file to read from; BlobMissing unless it is there with this size."""
        try:
            blob = open(self.path_of(sha256), "rb")
        except FileNotFoundError:
            raise BlobMissing(f"{self.describe()} has no file {sha256}") from None
        except OSError as error:  # not readable: permissions, a failing disk
            raise StoreUnreachable(f"{self.describe()} cannot give {sha256}: {error}") from None
        found = os.fstat(blob.fileno()).st_size
        if found != size:
            blob.close()
            raise BlobMissing(f"{self.describe()} holds {found} bytes of {sha256}, not {size}")
        return blob

    def problem(self):
        """Why the store cannot be used now, or None (for /health)."""
        return None if os.access(self.root, os.R_OK | os.W_OK | os.X_OK) else f"{self.describe()} is not writable"


class S3Store:
    """Blobs as objects <prefix><sha256> of one bucket. Credentials come from boto3's usual places (the
    AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables, ~/.aws/credentials, an instance
    role): never from the command line. Any failure of the store itself raises StoreUnreachable."""

    def __init__(self, client, bucket, prefix, incoming):
        self._client, self.bucket, self.prefix = client, bucket, prefix
        self._incoming = incoming_folder(incoming)
        # Parts in sequence: under gevent, threads would be greenlets anyway, and memory stays at one part.
        self._transfer = TransferConfig(use_threads=False, multipart_chunksize=16 * CHUNK_SIZE)

    def describe(self):
        return f"the bucket {self.bucket} at {self._client.meta.endpoint_url}"

    def key_of(self, sha256):
        return f"{self.prefix}{sha256}"

    def store_stream(self, stream, declared_sha256, max_bytes):
        temp, size = receive_stream(stream, self._incoming, declared_sha256, max_bytes)
        try:
            with self._answering():
                if not self._holds(declared_sha256):
                    self._client.upload_file(str(temp), self.bucket, self.key_of(declared_sha256),
                                             Config=self._transfer, ExtraArgs={"Metadata": {"sha256": declared_sha256}})
            return size
        finally:
            temp.unlink(missing_ok=True)

    def open(self, sha256, size):
        with self._answering():
            try:
                answer = self._client.get_object(Bucket=self.bucket, Key=self.key_of(sha256))
            except ClientError as error:
                if _not_found(error):
                    raise BlobMissing(f"{self.describe()} has no object {self.key_of(sha256)}") from None
                raise
        if answer["ContentLength"] != size:
            answer["Body"].close()
            raise BlobMissing(f"{self.describe()} holds {answer['ContentLength']} bytes of "
                              f"{self.key_of(sha256)}, not {size}")
        return answer["Body"]

    def problem(self):
        try:
            with self._answering():
                self._client.head_bucket(Bucket=self.bucket)
        except StoreUnreachable as error:
            return str(error)
        return None

    def _holds(self, sha256):
        """Whether the bucket holds this blob whole: stored by a registry, which records the sha256 it checked.
        An object of the same name put there otherwise (or damaged) is replaced."""
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self.key_of(sha256))
        except ClientError as error:
            if _not_found(error):
                return False
            raise
        return head.get("Metadata", {}).get("sha256") == sha256

    @contextmanager
    def _answering(self):
        try:
            yield
        except (BotoCoreError, ClientError, Boto3Error) as error:  # Boto3Error: upload_file's own failures
            raise StoreUnreachable(f"{self.describe()} failed: {error}") from error


def _not_found(error):
    return str(error.response.get("Error", {}).get("Code")) in ("NoSuchKey", "NotFound", "404")


def open_store(location, data_dir, s3_endpoint_url=""):
    """The store that location names: "" for the folder data_dir/blobs, or s3://bucket/prefix/ (with
    s3_endpoint_url for a store other than AWS). Raises StoreUnreachable, naming the fix, when the store
    cannot be used: better at start-up than at the first upload."""
    if not location:
        return FolderStore(Path(data_dir) / "blobs")
    parts = S3_LOCATION.fullmatch(location)
    if parts is None:
        # Not repeated in the message: it might hold credentials (s3://KEY:SECRET@bucket).
        raise StoreUnreachable("--result-store is not s3://BUCKET or s3://BUCKET/PREFIX (a bucket's "
                               "name, a prefix of letters, digits and ._-/ without empty or .. parts, no credentials:"
                               " those come from the environment); leave it out for the folder in --data-dir")
    prefix = f"{parts['prefix']}/" if parts["prefix"] else ""
    try:
        client = boto3.client("s3", endpoint_url=s3_endpoint_url or None, config=Config(
            s3={"addressing_style": "path"}, retries={"mode": "standard"}, connect_timeout=10, read_timeout=60))
    except ValueError as error:  # an endpoint that is no URL
        raise StoreUnreachable(f"--s3-endpoint-url {s3_endpoint_url!r} is not a URL ({error}); give "
                               "http(s)://HOST[:PORT]") from None
    store = S3Store(client, parts["bucket"], prefix, Path(data_dir) / "incoming")
    problem = store.problem()
    if problem:
        raise StoreUnreachable(f"{problem}; check the bucket's name, --s3-endpoint-url and the credentials "
                               "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    return store


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
