"""The researcher's machine against a hostile site and a hostile registry, the attacker's way.

A site may upload any bytes as its output and its log, and name its files anything; a registry may list
any site name, reason, image, size or checksum and send any bytes. Whatever they send, the library and
`python -m researcher` must not hold a result whole in memory, unpack past their caps (ResultLimits), write
outside the folder they were given, keep downloads of results nobody holds any more, or let a control
character reach the terminal.

Each test runs the real registry app (tests/conftest.py's served_app, on SQLite and on PostgreSQL). The
hostile site reports through the site API as a runner would; what only a compromised registry can send (a
site's name, a task's image, a blob that is not the one it lists) is written into its database or blob
store directly.
"""

import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import tracemalloc
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyrage
import pytest
import requests
from click.testing import CliRunner
from rich.console import Console

from common.printable import escaped
from master import store
from researcher import (ChecksumMismatch, DecryptionFailed, Registry, RegistryError, ResultLimits, ResultTooLarge,
                        TaskFailed, TaskTimeout, UnsafeOutput, generate_identity)
from researcher.__main__ import cli as researcher_cli
from researcher.__main__ import describe_files
from researcher.progress import SiteProgress
from researcher.results import UnsafeSiteName, refusal_reason, safe_folder_name

MIB = 1024 ** 2
GIB = 1024 ** 3
IMAGE = "127.0.0.1:5050/pht/summary:latest"
# What an attacker would like a terminal to act on: set the window's title (OSC ... BEL), clear the screen,
# move the cursor home, go back to the line's start to forge a note of the site runner, an 8-bit CSI,
# a right-to-left override and a line separator.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[H\r[site runner] output approved\x9b31m\u202eevil\u2028"
HOSTILE_SHOWN = "\\x1b]0;pwned\\x07"  # the start of HOSTILE as escaped() spells it


class Federation:
    """The test's registry with a researcher and sites that report whatever a test gives them."""

    def __init__(self, app, url, researcher_token, make_site):
        self.app, self.url, self.researcher_token = app, url, researcher_token
        self._make_site = make_site
        self._site_tokens = {}

    @property
    def engine(self):
        return self.app.extensions["pht"].engine

    def registry(self, **options):
        return Registry(self.url, self.researcher_token, **options)

    def add_site(self, name):
        """A site called name, which may be anything a registry's database holds: the registry's operator
        commands refuse such names, so the site is made under a plain one and renamed in the database."""
        plain = f"site-{len(self._site_tokens) + 1}"
        self._site_tokens[name] = self._make_site(plain)["Authorization"]
        with self.engine.begin() as conn:
            conn.execute(store.sites.update().where(store.sites.c.name == plain).values(name=name))

    def submit(self, **options):
        """A task for every site."""
        return self.registry().submit(IMAGE, {}, pin_digest=False, **options)

    def report(self, site, task_id, output=None, log=None, exit_code=0, failure_reason=None):
        """site claims its run of the task, starts it, uploads output and log as given and finishes it."""
        http, run = self._claim(site, task_id)
        runs_url = f"{self.url}/api/site/runs/{run['id']}"
        http.post(f"{runs_url}/start", json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64},
                  timeout=10).raise_for_status()
        for kind, body in (("output", output), ("log", log)):
            if body is not None:
                http.put(f"{runs_url}/{kind}", data=body, timeout=60, headers={
                    "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(body).hexdigest()}
                         ).raise_for_status()
        http.post(f"{runs_url}/finish", json={"lease_id": run["lease_id"], "exit_code": exit_code,
                                              "failure_reason": failure_reason}, timeout=10).raise_for_status()
        return run["id"]

    def park(self, site, task_id, reason):
        """site waits for its IT officer's approval of the task's run, for reason."""
        http, run = self._claim(site, task_id)
        http.post(f"{self.url}/api/site/runs/{run['id']}/park", timeout=10, json={
            "lease_id": run["lease_id"], "status": "awaiting_approval", "reason": reason,
            "image_digest": "sha256:" + "0" * 64}).raise_for_status()

    def _claim(self, site, task_id):
        http = requests.Session()
        http.headers["Authorization"] = self._site_tokens[site]
        run = http.post(f"{self.url}/api/site/claim", json={"wait_seconds": 0}, timeout=10).json()
        assert run["task_id"] == task_id
        return http, run

    def run_of(self, task_id, site):
        return next(run for run in self.registry().task(task_id)["runs"] if run["site"] == site)

    def blob_path(self, sha256):
        return self.app.extensions["pht"].blobs.path_of(sha256)

    def set_task(self, task_id, **values):
        with self.engine.begin() as conn:
            conn.execute(store.tasks.update().where(store.tasks.c.id == task_id).values(**values))


@pytest.fixture
def federation(app, served_app, make_researcher, make_site):
    fed = Federation(app, served_app, make_researcher()["Authorization"].split()[1], make_site)
    fed.add_site("hospital-a")
    return fed


def plain_tar(files):
    """An uncompressed tar of regular files: {name: bytes}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return buffer.getvalue()


def archive_of(files):
    """A .tar.gz of regular files: {name: bytes}; stored, not compressed, so that large ones are quick to make."""
    return gzip.compress(plain_tar(files), compresslevel=0)


def archive_with(member):
    """A .tar.gz of one member as given, without data (a link, a device, ...)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.addfile(member)
    return buffer.getvalue()


def zeros_gzipped(size):
    """size zero bytes as concatenated gzip members, one per MiB (a gzip reader reads them as one stream):
    about 1 kB per MiB, and quick to make."""
    whole, rest = divmod(size, MIB)
    return gzip.compress(bytes(MIB), 9) * whole + gzip.compress(bytes(rest), 9)


def gzip_bomb(name, size):
    """A .tar.gz of about size / 1000 bytes holding one file of size zero bytes, then output.txt."""
    header = tarfile.TarInfo(name)
    header.size = size
    padding = -size % tarfile.BLOCKSIZE
    return (gzip.compress(header.tobuf(tarfile.PAX_FORMAT)) + zeros_gzipped(size + padding)
            + gzip.compress(plain_tar({"output.txt": b"{}"})))


def pax_record(keyword, value):
    """One PAX extended header's record: "<length> keyword=value\\n", its length counting itself."""
    body = f" {keyword}={value}\n".encode()
    digits = 1
    while len(str(len(body) + digits)) != digits:
        digits += 1
    return str(len(body) + digits).encode() + body


def extended_header(kind, record):
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = kind, len(record)
    return header.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % tarfile.BLOCKSIZE)


def pax_header_bomb(size):
    """A .tar.gz whose first header is a PAX extended header of about size bytes (one path): tarfile reads such
    a header into memory whole before it looks at it."""
    return (gzip.compress(extended_header(tarfile.XHDTYPE, pax_record("path", "a" * size)))
            + gzip.compress(plain_tar({"x": b"x"})))


# What a measure of the library's memory may reach: the registry serves in this process, and its threads now and
# then allocate ~10 MiB at once (werkzeug's development server, whatever the size of the file it sends; the
# library alone, measured in a process of its own, stays under 1 MiB). Each attack holds 32 MiB or more.
MEMORY_BUDGET = 16 * MIB


@contextmanager
def peak_python_memory():
    """Yields a dict whose "peak" is, afterwards, the most memory Python's allocations held meanwhile, in all
    threads (see MEMORY_BUDGET)."""
    measured = {}
    tracemalloc.start()
    try:
        yield measured
    finally:
        measured["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def files_below(folder):
    """Every path below folder (none if it does not exist), relative to it."""
    return {path.relative_to(folder) for path in Path(folder).rglob("*")} if Path(folder).exists() else set()


def bytes_below(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# --- downloads and unpacking --------------------------------------------------------------------------------


def test_an_output_archive_is_downloaded_in_pieces_not_held_in_memory(federation, tmp_path):
    content = os.urandom(32 * MIB)
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"data.bin": content}), log=b"done\n")
    registry = federation.registry(download_dir=tmp_path / "downloads")

    with peak_python_memory() as memory:
        [result] = registry.results(task["id"])
    assert memory["peak"] < MEMORY_BUDGET, f"downloading a 32 MiB result held {memory['peak'] / MIB:.1f} MiB"
    with peak_python_memory() as memory:
        folder = result.extract_to(tmp_path / "extracted")
    assert memory["peak"] < MEMORY_BUDGET, f"extracting a 32 MiB result held {memory['peak'] / MIB:.1f} MiB"
    assert (folder / "data.bin").read_bytes() == content and result.log == "done\n"


def test_a_gzip_bomb_is_refused_before_it_is_unpacked(federation, tmp_path):
    """1 MB that unpacks to 1 GiB + 1 MiB of zeros: over the default cap, so nothing of it is unpacked."""
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=gzip_bomb("zeros.bin", GIB + MIB))
    [result] = federation.registry().results(task["id"])

    with peak_python_memory() as memory:
        with pytest.raises(ResultTooLarge) as refused:
            result.output
        with pytest.raises(ResultTooLarge):
            result.extract_to(tmp_path / "extracted")
    assert memory["peak"] < MEMORY_BUDGET
    assert files_below(tmp_path / "extracted") == set()
    message = str(refused.value)
    assert f"run {result.run_id} from hospital-a" in message and "max_unpacked_bytes" in message
    assert str(GIB) in message and "ResultLimits(max_unpacked_bytes=" in message


def test_unpacking_stops_at_the_cap_on_bytes_before_writing_past_it(federation, tmp_path):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"a.bin": b"a" * 600, "b.bin": b"b" * 600}))
    [result] = federation.registry(limits=ResultLimits(max_unpacked_bytes=1000)).results(task["id"])

    with pytest.raises(ResultTooLarge, match="max_unpacked_bytes"):
        result.extract_to(tmp_path / "extracted")
    assert bytes_below(tmp_path / "extracted") <= 1000
    assert result.files["a.bin"] == b"a" * 600  # read member by member: a.bin comes before the cap
    with pytest.raises(ResultTooLarge):
        result.files["b.bin"]

    [trusted] = federation.registry(limits=ResultLimits(max_unpacked_bytes=1200)).results(task["id"])
    assert trusted.files == {"a.bin": b"a" * 600, "b.bin": b"b" * 600}

    refused = cli_run(federation, "results", task["id"], "--max-unpacked-bytes", "1000")
    assert "max_unpacked_bytes=1000" in one_line_error(refused)
    assert "raise the cap: --max-unpacked-bytes N" in refused.stderr
    assert cli_run(federation, "results", task["id"], "--max-unpacked-bytes", "1200").exit_code == 0


def test_unpacking_stops_at_the_cap_on_members(federation, tmp_path):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({f"{n}.txt": b"n" for n in range(4)}))
    [result] = federation.registry(limits=ResultLimits(max_members=3)).results(task["id"])

    with pytest.raises(ResultTooLarge, match=r"hospital-a .*max_members.*ResultLimits\(max_members="):
        result.extract_to(tmp_path / "extracted")
    assert len(files_below(tmp_path / "extracted")) <= 3
    with pytest.raises(ResultTooLarge):
        sorted(result.files)


def test_a_header_that_announces_more_than_a_path_is_refused_before_it_is_read(federation):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=pax_header_bomb(32 * MIB))
    [result] = federation.registry().results(task["id"])

    with peak_python_memory() as memory:
        with pytest.raises(UnsafeOutput, match="hospital-a"):
            sorted(result.files)
    assert memory["peak"] < MEMORY_BUDGET


@pytest.mark.parametrize("headers", [
    # tarfile reads each next header by recursing: thousands in a row once ended in RecursionError.
    extended_header(tarfile.XHDTYPE, pax_record("path", "a")) * 3000,
    # tarfile copies a global header's fields into every later member: many members, many copies.
    extended_header(tarfile.XGLTYPE, pax_record("comment", "c" * 60_000)),
], ids=["thousands-of-extended-headers-in-a-row", "a-global-header"])
def test_headers_no_site_runner_writes_are_refused(federation, headers):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=gzip.compress(headers + plain_tar({"output.txt": b"1"})))
    [result] = federation.registry().results(task["id"])

    with pytest.raises(UnsafeOutput, match="hospital-a .* site runners"):
        result.output


def test_an_output_file_too_large_to_hold_in_memory_is_refused_and_can_be_extracted(federation, tmp_path):
    """Under the cap on unpacked bytes, 512 MiB of zeros in output.txt was read into memory whole by
    result.output; a file is read into memory only up to max_read_bytes (64 MiB), and extract_to takes any."""
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=gzip_bomb("output.txt", 512 * MIB))
    [result] = federation.registry().results(task["id"])

    with peak_python_memory() as memory:
        with pytest.raises(ResultTooLarge) as refused:
            result.output
        with pytest.raises(ResultTooLarge):
            dict(result.files.items())
    assert memory["peak"] < MEMORY_BUDGET
    assert "'output.txt'" in str(refused.value) and "max_read_bytes=67108864" in str(refused.value)

    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"model.bin": b"m" * 2000}))
    [result] = federation.registry(limits=ResultLimits(max_read_bytes=1000)).results(task["id"])
    with pytest.raises(ResultTooLarge, match="model.bin.*max_read_bytes=1000"):
        result.files["model.bin"]
    assert (result.extract_to(tmp_path / "extracted") / "model.bin").read_bytes() == b"m" * 2000


def test_output_nested_past_pythons_parser_is_its_text(federation):
    task = federation.submit()
    deep = "[" * 100_000 + "]" * 100_000
    federation.report("hospital-a", task["id"], output=archive_of({"output.txt": deep.encode()}))
    [result] = federation.registry().results(task["id"])
    assert result.output == deep


def symlink(name, target):
    member = tarfile.TarInfo(name)
    member.type, member.linkname = tarfile.SYMTYPE, target
    return member


def special(name, kind):
    member = tarfile.TarInfo(name)
    member.type = kind
    return member


def test_only_files_and_folders_are_unpacked(federation, tmp_path):
    """Site runners send only regular files and folders (client/output_archive.py): anything else is refused."""
    for member in (symlink("passwd", "/etc/passwd"), symlink("up", "../../.."), special("null", tarfile.CHRTYPE),
                   special("pipe", tarfile.FIFOTYPE), special("hard", tarfile.LNKTYPE),
                   special("holes", tarfile.GNUTYPE_SPARSE)):
        task = federation.submit()
        federation.report("hospital-a", task["id"], output=archive_with(member))
        [result] = federation.registry().results(task["id"])

        with pytest.raises(UnsafeOutput, match=f"run {result.run_id} from hospital-a holds a .*'{member.name}'"):
            result.extract_to(tmp_path / "extracted")
        assert files_below(tmp_path / "extracted") == set()
        with pytest.raises(UnsafeOutput):
            result.output


def test_nothing_is_written_outside_the_folder_extracted_to(federation, tmp_path):
    for name in ("../escaped.txt", f"{tmp_path}/absolute.txt", "a/../../escaped.txt"):
        task = federation.submit()
        federation.report("hospital-a", task["id"], output=archive_of({name: b"x"}))
        [result] = federation.registry().results(task["id"])

        with pytest.raises(UnsafeOutput, match="not a path inside"):
            result.extract_to(tmp_path / "a" / "b" / "extracted")
        assert files_below(tmp_path / "a") == {Path("b"), Path("b/extracted")}
        assert not (tmp_path / "absolute.txt").exists()

    # A link already in the folder (not the archive's) is not followed out of it either.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "tables").symlink_to(tmp_path / "elsewhere")
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"tables/counts.csv": b"n"}))
    [result] = federation.registry().results(task["id"])
    with pytest.raises(UnsafeOutput, match="outside the folder"):
        result.extract_to(tmp_path / "planted")
    assert files_below(tmp_path / "elsewhere") == set()


@pytest.mark.parametrize("name, refused", [
    ("tables/counts.csv", None),
    ("a/" * 2048 + "x", "a path longer than 4096 bytes"),
    ("..\\escaped.txt", "not a path inside /output/"),
    ("", "not a path inside /output/"),
])
def test_a_member_is_read_only_at_a_path_a_site_runner_could_send(name, refused):
    reason = refusal_reason(tarfile.TarInfo(name))
    assert reason is None if refused is None else refused in reason


def test_a_blob_that_is_not_the_one_the_registry_lists_is_refused_and_not_kept(federation, tmp_path):
    output, log = archive_of({"output.txt": b'{"n": 3}'}), b"done\n"
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=output, log=log)
    run = federation.run_of(task["id"], "hospital-a")
    tampered = bytearray(output)
    tampered[-1] ^= 1
    federation.blob_path(run["output_sha256"]).write_bytes(bytes(tampered))
    downloads = tmp_path / "downloads"

    with pytest.raises(ChecksumMismatch, match=f"the output of run {run['id']} from hospital-a") as mismatch:
        federation.registry(download_dir=downloads).results(task["id"])
    assert run["output_sha256"] in str(mismatch.value) and "download it again" in str(mismatch.value)
    assert files_below(downloads) == set()


def test_a_bad_result_among_many_downloaded_at_once_is_named_and_nothing_is_kept(federation, tmp_path):
    sites = [f"hospital-{letter}" for letter in "bcdefg"]
    for site in sites:
        federation.add_site(site)
    task = federation.submit()
    for number, site in enumerate(["hospital-a", *sites]):
        federation.report(site, task["id"], output=archive_of({"output.txt": b'{"n": %d}' % number}), log=b"done\n")
    for damaged in ("hospital-d", "hospital-f"):  # the first of them in the task's order is the one named
        blob = federation.blob_path(federation.run_of(task["id"], damaged)["output_sha256"])
        tampered = bytearray(blob.read_bytes())
        tampered[-1] ^= 1
        blob.write_bytes(bytes(tampered))
    downloads = tmp_path / "downloads"

    for _ in range(3):  # whichever download ends first
        with pytest.raises(ChecksumMismatch, match="from hospital-d"):
            federation.registry(download_dir=downloads).results(task["id"])
        assert files_below(downloads) == set()  # the results that did download are not left behind


def test_a_download_stops_at_its_cap_whatever_size_the_registry_lists(federation, tmp_path):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"a.bin": os.urandom(5000)}), log=b"x" * 5000)
    downloads = tmp_path / "downloads"

    with pytest.raises(ResultTooLarge, match=r"the output of .*max_archive_bytes"):
        federation.registry(limits=ResultLimits(max_archive_bytes=1000), download_dir=downloads).results(task["id"])
    with pytest.raises(ResultTooLarge, match=r"the log of .*max_log_bytes"):
        federation.registry(limits=ResultLimits(max_log_bytes=1000), download_dir=downloads).results(task["id"])
    listed = federation.registry().task(task["id"])
    # What a registry that understates the sizes lists (ours refuses to send a blob of another size than it lists).
    understated = {**listed, "runs": [{**run, "output_size": 10, "log_size": 10} for run in listed["runs"]]}
    with pytest.raises(ResultTooLarge, match="max_archive_bytes"):
        federation.registry(limits=ResultLimits(max_archive_bytes=1000), download_dir=downloads).results(understated)
    assert files_below(downloads) == set()


def test_downloads_last_as_long_as_their_results_over_a_long_loop(federation, tmp_path):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"output.txt": b'{"n": 3}'}), log=b"done\n")
    downloads = tmp_path / "downloads"
    registry = federation.registry(download_dir=downloads)

    for _round in range(100):  # a federated analysis's rounds
        for result in registry.results(task["id"]):
            assert result.output == {"n": 3}
        assert len(files_below(downloads)) <= 2 * 3, "downloads of earlier rounds are still on disk"
    del result
    assert files_below(downloads) == set()

    with registry.result(federation.run_of(task["id"], "hospital-a")) as result:
        assert result.read_json("output.txt") == {"n": 3}
    assert files_below(downloads) == set()


def test_encrypted_results_are_decrypted_as_they_stream(federation, tmp_path):
    public_key = generate_identity(tmp_path / "identity.txt")
    federation.registry().register_public_key(public_key)
    federation.add_site("hospital-b")
    recipient = pyrage.x25519.Recipient.from_str(public_key)
    task = federation.submit(encrypt=True)
    content = os.urandom(32 * MIB)
    federation.report("hospital-a", task["id"], output=pyrage.encrypt(archive_of({"data.bin": content}), [recipient]),
                      log=pyrage.encrypt(b"secret log\n", [recipient]))
    federation.report("hospital-b", task["id"], output=pyrage.encrypt(archive_of({"x": b"x"}), [recipient])[:-100])
    registry = federation.registry(identity_file=tmp_path / "identity.txt")

    run_a, run_b = (federation.run_of(task["id"], site) for site in ("hospital-a", "hospital-b"))
    with peak_python_memory() as memory:
        result = registry.result(run_a, encrypted=True)
    assert memory["peak"] < MEMORY_BUDGET
    assert result.files["data.bin"] == content and result.log == "secret log\n"
    with pytest.raises(DecryptionFailed, match=f"the output of run {run_b['id']} from hospital-b"):
        registry.result(run_b, encrypted=True)


# --- site names as folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("site, folder", [
    ("hospital-a", "hospital-a"),
    ("../../x", "%2E.%2F..%2Fx"),
    ("/abs/path", "%2Fabs%2Fpath"),
    (".", "%2E"),
    ("..", "%2E%2E"),
    ("a\x00b", "a%00b"),
    ("a\\b", "a%5Cb"),
    ("tab\there", "tab%09here"),
    ("\x1b]0;x\x07", "%1B%5D0%3Bx%07"),
    ("Hospital-A", "%48ospital-%41"),
    ("100%", "100%25"),
    ("-rf", "%2Drf"),
    ("trailing.", "trailing%2E"),
    ("con", "%63on"),
    ("lpt1.log", "%6Cpt1.log"),
    ("é", "%C3%A9"),
])
def test_a_site_name_becomes_one_safe_folder_name(site, folder):
    assert safe_folder_name(site) == folder


@pytest.mark.parametrize("site", ["", "a" * 201])
def test_a_site_name_that_cannot_be_a_folder_name_is_refused(site):
    with pytest.raises(UnsafeSiteName, match="cannot be a folder name"):
        safe_folder_name(site)


def cli_run(federation, *args):
    env = {"PHT_REGISTRY_URL": federation.url, "PHT_TOKEN": federation.researcher_token,
           "PHT_CONFIG": "/nonexistent/researcher.toml", "PHT_IDENTITY": None}
    return CliRunner().invoke(researcher_cli, [str(arg) for arg in args], env=env, catch_exceptions=False)


def one_line_error(done):
    assert done.exit_code == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


HOSTILE_SITE_NAMES = ["../../escape", ".", "..", "a/b", "a\\b", "\x1b]0;x\x07", "Hospital-A", "con"]


def test_the_cli_writes_results_only_under_the_output_dir(federation, tmp_path):
    absolute = str(tmp_path / "absolute")
    for name in [*HOSTILE_SITE_NAMES, absolute]:
        federation.add_site(name)
    task = federation.submit()
    for name in ["hospital-a", *HOSTILE_SITE_NAMES, absolute]:
        federation.report(name, task["id"], output=archive_of({"r.txt": name.encode()}), log=b"log\n")
    output_dir = tmp_path / "a" / "b" / "out"
    before = files_below(tmp_path)

    done = cli_run(federation, "results", task["id"], "--output-dir", output_dir)
    assert done.exit_code == 0, done.stderr
    written = {tmp_path / path for path in files_below(tmp_path) - before}
    assert all(output_dir in path.parents or path in (output_dir, *output_dir.parents) for path in written), written
    folders = {safe_folder_name(name) for name in ["hospital-a", *HOSTILE_SITE_NAMES, absolute]}
    assert {path.name for path in output_dir.iterdir()} == folders | {f"{folder}.log" for folder in folders}
    assert (output_dir / "%2E.%2F..%2Fescape" / "r.txt").read_text() == "../../escape"
    assert (output_dir / "%2E%2E.log").read_text() == "log\n"


@pytest.mark.parametrize("sites", [[""], ["x", "x.log"]], ids=["empty", "a-folder-is-another-site-s-log"])
def test_site_names_that_cannot_be_folders_stop_the_cli_before_it_writes(federation, tmp_path, sites):
    for name in sites:
        federation.add_site(name)
    task = federation.submit()
    for name in ["hospital-a", *sites]:
        federation.report(name, task["id"], output=archive_of({"r.txt": b"r"}), log=b"log\n")

    done = cli_run(federation, "results", task["id"], "--output-dir", tmp_path / "out")
    assert "cannot" in one_line_error(done)
    assert not (tmp_path / "out").exists()


def test_a_link_planted_in_the_output_dir_is_not_followed(federation, tmp_path):
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"r.txt": b"r"}), log=b"log\n")
    output_dir, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    output_dir.mkdir()
    elsewhere.mkdir()
    (output_dir / "hospital-a.log").symlink_to(elsewhere / "planted.log")

    done = cli_run(federation, "results", task["id"], "--output-dir", output_dir)
    assert "outside" in one_line_error(done)
    assert files_below(elsewhere) == set()


# --- what reaches the terminal --------------------------------------------------------------------------------


def assert_terminal_safe(text):
    """Nothing in text a terminal would act on, but newlines and tabs."""
    assert escaped(text, keep="\n\t") == text, text


def test_hostile_strings_reach_the_terminal_escaped(federation, tmp_path):
    site = "evil" + HOSTILE
    federation.add_site(site)
    submitted = cli_run(federation, "submit", IMAGE, "--no-pin", "--name", HOSTILE)
    assert submitted.exit_code == 0, submitted.stderr
    task_id = int(submitted.stdout.split()[1])
    federation.set_task(task_id, image=IMAGE + HOSTILE)
    federation.report("hospital-a", task_id, output=archive_of({"output.txt": HOSTILE.encode()}), log=b"ok\n")
    # A file's name that is not UTF-8 reads as a lone surrogate, which no terminal encoding can write.
    files = {HOSTILE + ".txt": b"x", "not-utf-8-\udcff.txt": b"x", "output.txt": HOSTILE.encode()}
    federation.report(site, task_id, output=archive_of(files),
                      log=f"first line\n{HOSTILE}\n".encode(), exit_code=1, failure_reason=HOSTILE)
    parked = federation.submit(sites=["hospital-a"])
    federation.park("hospital-a", parked["id"], HOSTILE)

    registry = federation.registry()
    with pytest.raises(TaskFailed) as failed:
        registry.results(task_id)
    with pytest.raises(TaskTimeout) as timed_out:
        registry.wait(parked["id"], timeout_seconds=0.5, progress=False)
    for error in (failed.value, timed_out.value):
        assert escaped(str(error), keep="") == str(error) and HOSTILE_SHOWN in str(error)
    # The log's last line, whole: its "\r" does not make the rest pass for a note of the site runner.
    assert f"(log: {escaped(HOSTILE.strip(), keep='')})" in str(failed.value)

    shown = {}
    for key, args in (("sites", ["sites"]), ("tasks", ["tasks"]), ("sessions", ["sessions"]),
                      ("failed", ["wait", task_id]), ("not all", ["results", task_id]),
                      ("table", ["results", task_id, "--partial"]),
                      ("logs", ["results", task_id, "--partial", "--logs"]),
                      ("files", ["results", task_id, "--partial", "--output-dir", tmp_path / "out"]),
                      ("timeout", ["wait", parked["id"], "--timeout", "0.5"]), ("cancel", ["cancel", parked["id"]])):
        shown[key] = done = cli_run(federation, *args)
        assert_terminal_safe(done.stdout)
        assert_terminal_safe(done.stderr)
    assert_terminal_safe(submitted.stdout)
    assert HOSTILE_SHOWN in shown["logs"].stdout and HOSTILE_SHOWN in shown["table"].stdout
    assert HOSTILE_SHOWN in one_line_error(shown["failed"]) and HOSTILE_SHOWN in shown["timeout"].stderr
    assert shown["files"].exit_code == 0 and shown["timeout"].exit_code == 3

    as_json = cli_run(federation, "results", task_id, "--partial", "--json")
    assert "\x1b" not in as_json.stdout and "\u202e" not in as_json.stdout
    by_site = {result["site"]: result for result in json.loads(as_json.stdout)}
    assert by_site[site]["reason"] == HOSTILE and by_site[site]["output"] == HOSTILE  # JSON keeps them exact


def test_the_results_table_names_a_few_files_and_counts_the_rest():
    """A site may send 100,000 files: one table cell does not list them all."""
    first_ten = ", ".join(f"{n:02}.csv" for n in range(10))
    assert describe_files({f"{n:02}.csv": b"" for n in range(25)}) == first_ten + " and 15 more"
    assert describe_files({"output.txt": b""}) == "output.txt" and describe_files({}) == ""


def test_the_progress_display_shows_hostile_strings_escaped():
    screen = io.StringIO()
    with SiteProgress(1, console=Console(file=screen, force_terminal=True, width=400)) as display:
        display.show([{"site": HOSTILE, "status": HOSTILE, "reason": HOSTILE}])
        display.live.refresh()
    drawn = screen.getvalue()
    for raw in ("\x07", "\x1b]0;", "\x1b[2J", "\x9b", "\u202e", "\u2028", "\r[site runner]"):
        assert raw not in drawn
    assert HOSTILE_SHOWN in drawn


@pytest.mark.parametrize("status", [503, 502, 504])
def test_a_read_answered_503_at_the_registrys_cap_is_asked_again(status):
    """A registry at its connection cap answers 503 with Retry-After (master/server.py), and a balancer whose
    replica died during the request 502 or 504; a researcher's read then waits and asks again instead of
    failing, while a post is never sent twice."""
    asked = []

    class AtItsCapOnce(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(("GET", self.path))
            if len(asked) == 1:
                self.send_response(status)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps({"items": [], "total": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            asked.append(("POST", self.path))
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), AtItsCapOnce)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        registry = Registry(f"http://127.0.0.1:{server.server_address[1]}", "token")
        assert registry.sites() == []
        assert [method for method, _ in asked] == ["GET", "GET"]
        with pytest.raises(RegistryError, match="503"):
            registry.cancel(1)
        assert [method for method, _ in asked] == ["GET", "GET", "POST"]
    finally:
        server.shutdown()
        server.server_close()
