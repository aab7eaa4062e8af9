"""One site's answer to a task, and reading the files the algorithm left in /output/.

A result comes from another organisation's machine through a registry that may be compromised, so
nothing in it is trusted:

- Its output archive and log are files in a temporary folder of their own (Registry.result downloads
  them there), never held whole in memory. The folder lasts as long as the RunResult, or until its
  close(): a loop of many rounds keeps on disk only the results it still holds.
- The archive is read as a stream, member by member, and only what a site runner sends is read:
  regular files and folders at paths inside /output/ (client/output_archive.py). Anything else (a
  link, a device, a path outside, a header announcing more than a path) raises UnsafeOutput.
- Reading stops at the caps of ResultLimits before it unpacks past one: ResultTooLarge names the
  site, the cap and how to raise it.
- Whatever of it a message quotes (a site's name, a file's name, a log line) is escaped for the
  terminal (`common.printable.escaped`).
"""

import gzip
import json
import re
import shutil
import tarfile
import tempfile
import weakref
import zlib
from collections.abc import ItemsView, Mapping, ValuesView
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path

from common.printable import escaped
from master import lifecycle

# The file an algorithm writes its main answer to, by convention (the original PyTaskManager's).
OUTPUT_FILE = "output.txt"
RUNNER_NOTE = "[site runner] "  # how the site runner starts the lines it adds to a log (docs/container-contract.md)

MIB = 1024 ** 2
GIB = 1024 ** 3
# Longest path a member may have: Linux's PATH_MAX, which no path a site runner reads in /output/ exceeds.
MAX_PATH_BYTES = 4096
# A PAX header or GNU long name carries a path and a few fields; tarfile reads one into memory whole, so a
# longer one is refused before it is read.
MAX_EXTENDED_HEADER_BYTES = 64 * 1024
# Longest folder name made of a site's name (escaped, so ASCII): with ".log" it stays under the 255 bytes
# file systems allow in a name.
MAX_FOLDER_NAME_CHARS = 200


def describe_file(kind, run_id, site):
    """How messages name a run's output or log: "the output of run 7 from hospital-a"."""
    return f"the {kind} of run {run_id} from {escaped(site)}"


@dataclass(frozen=True)
class ResultLimits:
    """How much of one site's result the library downloads and unpacks; past a cap it raises ResultTooLarge
    before writing more. The defaults take whatever a site with its default limits sends (docs/site-config.md:
    max_output_bytes, max_output_files) through a registry with its default --max-result-bytes. Federated
    results are usually kilobytes, but a cap is a guard against a bomb, not a quota: raise one for a
    consortium whose sites allow more, e.g. Registry(..., limits=ResultLimits(max_unpacked_bytes=10 * 1024 ** 3)).
    """

    max_archive_bytes: int = field(default=2 * GIB, metadata={"what": "bytes of a site's output archive, as sent"})
    max_unpacked_bytes: int = field(default=GIB, metadata={"what": "bytes of a site's output files together"})
    max_members: int = field(default=100_000, metadata={"what": "files and folders in a site's output"})
    # result.log holds the log in memory; sites keep at most ~30 MiB of one (the first and last 10 MiB of the
    # container's output and 10 MiB of /log.txt).
    max_log_bytes: int = field(default=64 * MIB, metadata={"what": "bytes of a site's log"})
    # files[...], output and items() hand a file over as bytes: unlike extract_to(), they hold it in memory.
    max_read_bytes: int = field(default=64 * MIB, metadata={
        "what": "bytes of one output file read into memory (files[...], output); extract_to() writes any size"})

    def __post_init__(self):
        for limit in fields(self):
            value = getattr(self, limit.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"ResultLimits.{limit.name} must be a whole number of at least 1, not {value!r}")


class ResultTooLarge(Exception):
    """A site's output or log is over a cap of ResultLimits; nothing past the cap was written.
    `limit` names the cap, `value` is its value."""

    def __init__(self, subject, limit, value):
        self.subject, self.limit, self.value = subject, limit, value
        super().__init__(self.explain(f"Registry(..., limits=ResultLimits({limit}=...))"))

    def explain(self, raising):
        """The message, with the caller's way of raising the cap (a parameter, a CLI option)."""
        what = next(limit.metadata["what"] for limit in fields(ResultLimits) if limit.name == self.limit)
        return (f"{self.subject} is over a cap: {self.limit}={self.value} ({what}); "
                f"if you trust it, raise the cap: {raising}")


class UnsafeOutput(Exception):
    """A site's output archive is not what site runners send (a link, a device, a path outside /output/,
    a damaged archive); the message names the site and what it holds."""


class UnsafeSiteName(ValueError):
    """A site's name cannot be made a folder name, or two sites' names would share one."""


def safe_folder_name(site):
    """Pure: site's name as one folder name, safe on any file system, the same for the same name and different
    for different names. Lowercase letters, digits, '.', '_' and '-' stay; every other character becomes %XX
    for each byte of its UTF-8 ('%' too, so no two names meet), and so does a '.' or '-' that starts the name
    and a '.' that ends it (no '.', '..', hidden folder or option-like name; Windows drops a final '.'). A name
    Windows keeps for a device (con, nul, com1, ...) has its first letter escaped. Raises UnsafeSiteName for
    an empty name or one longer than MAX_FOLDER_NAME_CHARS once escaped."""
    escaped_name = "".join(char if re.fullmatch(r"[a-z0-9._-]", char) else _percent(char) for char in site)
    if escaped_name[:1] in (".", "-"):
        escaped_name = _percent(escaped_name[0]) + escaped_name[1:]
    if escaped_name.endswith("."):
        escaped_name = escaped_name[:-1] + _percent(".")
    if re.fullmatch(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?", escaped_name):
        escaped_name = _percent(escaped_name[0]) + escaped_name[1:]
    if not escaped_name or len(escaped_name) > MAX_FOLDER_NAME_CHARS:
        problem = "it is empty" if not escaped_name else f"it is longer than {MAX_FOLDER_NAME_CHARS} characters escaped"
        raise UnsafeSiteName(f"site name '{escaped(site[:MAX_FOLDER_NAME_CHARS])}' cannot be a folder name: "
                             f"{problem}; extract its result with the library, to a folder you name")
    return escaped_name


def _percent(char):
    return "".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass"))


class DownloadFolder:
    """A temporary folder holding one run's downloads, removed by close() or once nothing refers to it any more
    (and at the latest when Python exits)."""

    def __init__(self, parent, run_id):
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"pht-run-{run_id}-", dir=parent))
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)

    def close(self):
        self._remove()


@dataclass
class RunResult:
    """One site's answer. Its output archive and log are files that last as long as the RunResult (or until
    close(); `with registry.result(run) as result:` does it); extract_to() copies what you keep."""

    run_id: int
    site: str
    status: str  # completed, failed, refused or cancelled; pending, claimed or running if unfinished
    reason: str | None  # why it failed, was refused or cancelled
    exit_code: int | None
    image_digest: str | None  # the image the site ran, by digest
    # What the algorithm read through the site's SPARQL gateway: {"queries", "bytes", "refused"};
    # None when the site did not report it (no gateway, an older runner, or the run never started).
    sparql: dict | None = None
    archive_path: Path | None = field(default=None, repr=False)  # /output/ as the site uploaded it, a .tar.gz
    log_path: Path | None = field(default=None, repr=False)  # the algorithm's standard output and error
    limits: ResultLimits = field(default=ResultLimits(), repr=False)
    # The temporary folder archive_path and log_path are in, when the library downloaded them.
    downloads: DownloadFolder | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self):
        return self.status == lifecycle.COMPLETED

    @property
    def log(self):
        """The log as text (undecodable bytes replaced); "" when the site sent none. Read from its file each time."""
        return self.log_path.read_bytes().decode("utf-8", "replace") if self.log_path else ""

    @cached_property
    def files(self):
        """The output files, path inside /output/ -> bytes, each read from the archive when asked for."""
        return OutputFiles(self.archive_path, self.limits, describe_file("output", self.run_id, self.site),
                           keep_alive=self.downloads)

    @property
    def output(self):
        """output.txt parsed as JSON when it is JSON, else its text; None when there is none."""
        try:
            text = self.files[OUTPUT_FILE].decode("utf-8", "replace")
        except KeyError:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):  # Python's parser recurses: a site can nest past its limit
            return text

    @property
    def folder_name(self):
        """The site's name as a folder name: safe_folder_name(site). Raises UnsafeSiteName."""
        return safe_folder_name(self.site)

    def read_json(self, name):
        return json.loads(self.files[name])

    def read_text(self, name):
        return self.files[name].decode("utf-8")

    def extract_to(self, folder):
        """Write the output files below folder (created if missing); returns it as a Path.
        See OutputFiles.extract_to."""
        return self.files.extract_to(folder)

    def save_log(self, path):
        """Write the log to path, byte for byte as the site sent it (empty when it sent none)."""
        if self.log_path:
            shutil.copyfile(self.log_path, path)
        else:
            Path(path).write_bytes(b"")

    def describe_failure(self):
        """One line: which site, what happened and why, with the log's last line when the algorithm failed."""
        if self.ok:
            return f"{escaped(self.site)} completed"
        words = f"{self.site} {self.status}"
        if self.reason:
            words += f": {self.reason}"
        # The algorithm's own last words: the site runner's notes come after them. Lines end at "\n" alone, as
        # the runner writes them: a "\r" cannot start a line that passes for one of its notes.
        last_line = next((line for line in reversed(self.log.split("\n"))
                          if line.strip() and not line.startswith(RUNNER_NOTE)), None)
        if self.exit_code not in (None, 0) and last_line:
            words += f" (log: {last_line.strip()})"
        return escaped(words)

    def close(self):
        """Remove the downloaded archive and log now, instead of when the result is no longer referred to;
        its files, output and log cannot be read after it."""
        if self.downloads is not None:
            self.downloads.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class OutputFiles(Mapping):
    """An output's files, by their path inside /output/, as bytes: each read from the archive when asked for,
    never all at once. A gzip stream cannot be entered in the middle, so each look-up reads the archive from
    its start: to read many files, go through items() once, or extract_to() a folder.

    Every read checks each member it passes (UnsafeOutput) and counts it against the caps (ResultTooLarge).
    A path the archive holds twice (no site runner sends one) reads as its first, and extracts as its last.
    """

    def __init__(self, archive_path, limits, subject, keep_alive=None):
        self._archive_path, self._limits, self._subject = archive_path, limits, subject
        self._keep_alive = keep_alive  # the downloads' folder, which must last as long as this does

    def __getitem__(self, name):
        with self._members() as members:
            for member, archive in members:
                if member.isfile() and member.name == name:
                    return self._read(member, archive)
        raise KeyError(name)

    def __contains__(self, name):
        return any(found == name for found in self)

    def __iter__(self):
        with self._members() as members:
            yield from (member.name for member, _archive in members if member.isfile())

    def __len__(self):
        return sum(1 for _name in self)

    def items(self):
        return _ItemsInOnePass(self)

    def values(self):
        return _ValuesInOnePass(self)

    def __repr__(self):
        return f"<OutputFiles of {self._subject}>"

    def extract_to(self, folder):
        """Write the files and folders below folder (created if missing), member by member; returns it as a Path.

        Stops with ResultTooLarge before the member that would pass a cap, and with UnsafeOutput at a member no
        site runner sends; what was written before stays. Extraction also applies tarfile's "data" filter, which
        refuses a path that leads out of folder through a link already in it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with self._members() as members:
            for member, archive in members:
                # Folders get no attributes from the archive: a read-only one would stop the files inside it.
                archive.extract(member, folder, set_attrs=member.isfile(), filter="data")
        return folder

    def _read_all(self):
        with self._members() as members:
            for member, archive in members:
                if member.isfile():
                    yield member.name, self._read(member, archive)

    def _read(self, member, archive):
        if member.size > self._limits.max_read_bytes:
            raise ResultTooLarge(f"{self._subject}'s file '{escaped(member.name)}'", "max_read_bytes",
                                 self._limits.max_read_bytes)
        return archive.extractfile(member).read()

    @contextmanager
    def _members(self):
        """The archive's members as a stream, each yielded with the archive once it passed the checks.
        Raises UnsafeOutput or ResultTooLarge."""
        if self._archive_path is None:
            yield iter(())
            return
        try:
            with gzip.open(self._archive_path) as unzipped, \
                    tarfile.open(fileobj=unzipped, mode="r|", tarinfo=_SiteRunnerHeader) as archive:
                yield self._checked(archive)
        except _RefusedHeader as refused:
            raise UnsafeOutput(f"{self._subject} holds {refused}") from None
        except tarfile.FilterError as error:  # a link already in the folder extract_to was given leads out of it
            raise UnsafeOutput(f"{self._subject} would be written outside the folder: "
                               f"{escaped(str(error))}") from None
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise UnsafeOutput(f"{self._subject} is not an archive as site runners make them: "
                               f"{escaped(str(error))}") from None

    def _checked(self, archive):
        count = unpacked = 0
        while (member := archive.next()) is not None:
            # Read once, as a stream: tarfile's list of the members passed would hold every one's name.
            archive.members.clear()
            count += 1
            if count > self._limits.max_members:
                raise ResultTooLarge(self._subject, "max_members", self._limits.max_members)
            problem = refusal_reason(member)
            if problem:
                raise UnsafeOutput(f"{self._subject} holds {problem}")
            unpacked += member.size if member.isfile() else 0
            if unpacked > self._limits.max_unpacked_bytes:
                raise ResultTooLarge(self._subject, "max_unpacked_bytes", self._limits.max_unpacked_bytes)
            yield member, archive


class _ItemsInOnePass(ItemsView):
    def __iter__(self):
        yield from self._mapping._read_all()


class _ValuesInOnePass(ValuesView):
    def __iter__(self):
        for _name, content in self._mapping._read_all():
            yield content


_MEMBER_KINDS = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
                 tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a FIFO"}


def refusal_reason(member):
    """Pure: why an output archive's member is refused, or None. Site runners send regular files and folders,
    at relative paths inside /output/ no longer than PATH_MAX (client/output_archive.py), and nothing else."""
    name = escaped(member.name)
    if member.sparse is not None:
        return _SPARSE_REFUSED.format(name)
    if not (member.isfile() or member.isdir()):
        kind = _MEMBER_KINDS.get(member.type, "a special member")
        return f"{kind}, '{name}': site runners send only files and folders"
    # A backslash counts as a separator too: it is one where the result may be unpacked (Windows).
    if (not member.name or member.name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", member.name)
            or "\x00" in member.name):
        return f"'{name}', which is not a path inside /output/"
    if len(member.name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        return f"a path longer than {MAX_PATH_BYTES} bytes, '{name[:80]}...'"
    return None


class _RefusedHeader(Exception):
    """A header refused before tarfile reads what it announces; the message says what it was."""


_EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class _SiteRunnerHeader(tarfile.TarInfo):
    """A member's header, refused before tarfile reads what it announces when that is more than a site runner's
    tarfile writes (PAX format, client/output_archive.py), which is at most one PAX header before a member:
    - an extended header (PAX, or a GNU long name) over MAX_EXTENDED_HEADER_BYTES, which tarfile would read
      into memory whole;
    - a second extended header in a row: tarfile reads each next header by recursing, so thousands of them end
      in RecursionError, and each one's fields are copied on to the next;
    - a PAX global header, whose fields tarfile copies into every member after it (a quadratic bomb);
    - a GNU sparse file, whose map tarfile would read without end.
    tarfile's own hook for this is _proc_member (see its comment), and _proc_gnusparse_10 reads a PAX sparse map.
    """

    def _proc_member(self, archive):
        if self.type == tarfile.XGLTYPE:
            raise _RefusedHeader("a PAX global header: site runners never write one")
        in_a_row = archive.__dict__.get("_pht_extended_headers_in_a_row", 0)
        archive._pht_extended_headers_in_a_row = in_a_row + 1 if self.type in _EXTENDED_HEADERS else 0
        if self.type in _EXTENDED_HEADERS and in_a_row:
            raise _RefusedHeader("two extended headers in a row: site runners write one before a member at most")
        if self.type in _EXTENDED_HEADERS and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise _RefusedHeader(f"a header of {self.size} bytes, over the {MAX_EXTENDED_HEADER_BYTES} bytes "
                                 "that hold a path: site runners never write one")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _RefusedHeader(_SPARSE_REFUSED.format(escaped(self.name)))
        return super()._proc_member(archive)

    def _proc_gnusparse_10(self, next, pax_headers, archive):
        raise _RefusedHeader(_SPARSE_REFUSED.format(escaped(next.name)))


_SPARSE_REFUSED = "a sparse file, '{}': site runners send only files and folders"
