"""The site runner's pure decisions, without servers: time limits, output limits, what a
container is told, and the whitelist against the lookalike names the issue lists."""

import gzip
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from client import output_archive
from client.claim import parse_claim
from client.image_policy import refusal_reason
from client.runner import (container_environment, progress_of, shortened, skipped_note, timeout_for,
                           timeout_reason)
from client.site_config import parse_site_config

SITE = {"registry_url": "http://127.0.0.1:5000", "site_name": "hospital-a", "site_token": "pht_x",
        "sparql_endpoint": "http://127.0.0.1:7878/query", "whitelist": [".*"], "endpoint_token": "t",
        "container": {"timeout_seconds": 600}}
CONFIG = parse_site_config(SITE)


def claim(**fields):
    return parse_claim({"id": 7, "task_id": 5, "session_id": 3, "image": "127.0.0.1:5050/pht/x:1",
                        "lease_id": "lease", "lease_seconds": 60, **fields})


@pytest.mark.parametrize("asked, allowed", [(None, 600), (60, 60), (6000, 600)])
def test_a_task_may_ask_for_less_time_never_more(asked, allowed):
    assert timeout_for(claim(timeout_seconds=asked), CONFIG.container) == allowed


def test_timeout_reason_only_once_the_time_is_over():
    assert timeout_reason(started_at=1000, timeout_seconds=60, now=1060) is None
    assert timeout_reason(started_at=1000, timeout_seconds=60, now=1061) == "timeout: still running after 60 s"


def test_output_limit():
    assert output_archive.too_large_reason(100, 100) is None
    assert output_archive.too_large_reason(101, 100) == "output is 101 bytes, over this site's limit of 100 bytes"


def test_container_environment_has_the_contract_and_the_pytaskmanager_names():
    environment = container_environment(CONFIG, claim())
    # The run's SPARQL gateway, on the loopback of the relay's network namespace: never the endpoint itself.
    assert environment == {
        "SPARQL_ENDPOINT": "http://127.0.0.1:8890/sparql", "TASK_ID": "5", "SESSION_ID": "3",
        "SITE_NAME": "hospital-a", "RUN_ID": "3", "endpointUrl": "http://127.0.0.1:8890/sparql",
        "endpointType": "sparql", "endpointToken": "t"}


def test_with_host_networking_algorithms_get_the_endpoint_itself():
    config = parse_site_config({**SITE, "container": {"network": "host"}, "allow_host_network": True})
    environment = container_environment(config, claim())
    assert environment["SPARQL_ENDPOINT"] == environment["endpointUrl"] == "http://127.0.0.1:7878/query"


def test_progress_in_words_for_the_log():
    assert progress_of({"run": {}}) == "claimed"
    assert progress_of({"run": {}, "image": "x"}) == "image fetched"
    assert progress_of({"run": {}, "image": "x", "container_id": "c"}) == "its container was created"
    assert progress_of({"run": {}, "outcome": {}}) == "ended, not yet reported"


def test_reasons_fit_the_registrys_limit():
    assert shortened(None) is None
    assert shortened("short") == "short"
    assert len(shortened("x" * 5000)) == 2000


def test_archive_skips_links_and_keeps_files(tmp_path):
    output, outside = tmp_path / "output", tmp_path / "secret.txt"
    output.mkdir()
    outside.write_text("secret")
    (output / "result.txt").write_text("result")
    (output / "link").symlink_to(outside)
    (output / "folder-link").symlink_to(tmp_path)
    skipped = output_archive.pack_output(output, tmp_path / "out.tar.gz", max_bytes=1000)
    assert sorted(skipped) == ["folder-link", "link"]
    with pytest.raises(output_archive.OutputTooLarge):
        output_archive.pack_output(output, tmp_path / "again.tar.gz", max_bytes=5)
    assert not Path(tmp_path / "again.tar.gz").exists()


def nest(folder, depth, leaf):
    """depth nested folders d/d/d/... below folder, with the file leaf at the bottom; made relative to open
    folders, as an algorithm could, so no path is ever longer than the system allows."""
    at = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=at)
        inner = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at = inner
    os.close(os.open(leaf, os.O_WRONLY | os.O_CREAT, dir_fd=at))
    os.close(at)


@pytest.fixture
def output(tmp_path):
    folder = tmp_path / "output"
    folder.mkdir()
    yield folder
    subprocess.run(["rm", "-rf", str(folder)], check=True)  # deeper than shutil.rmtree can remove


def test_a_tree_deeper_than_pythons_recursion_limit_is_packed(tmp_path, output):
    nest(output, 1500, "deep.txt")
    assert 1500 > sys.getrecursionlimit()
    assert output_archive.pack_output(output, tmp_path / "out.tar.gz", max_bytes=1000) == []
    with tarfile.open(tmp_path / "out.tar.gz") as archive:
        assert "d/" * 1500 + "deep.txt" in archive.getnames()


def test_the_output_is_plain_gzip_shrunk_where_it_shrinks_and_stored_where_it_does_not(tmp_path, output):
    text = "".join(f"{number},{number % 90},M,{number * 7 % 1000 / 10}\n" for number in range(40000)).encode()
    noise = os.urandom(1024 * 1024)
    (output / "table.csv").write_bytes(text)
    (output / "model.bin").write_bytes(noise)
    archive_path = tmp_path / "out.tar.gz"
    assert output_archive.pack_output(output, archive_path, max_bytes=10 * 1024 * 1024) == []

    packed = archive_path.stat().st_size
    assert packed < len(noise) + len(text) / 2  # the text shrank
    assert packed < (len(noise) + len(text)) * 1.01  # the noise did not grow: stored, not inflated
    assert archive_path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as every researcher's tools read it
    with gzip.open(archive_path) as unzipped, tarfile.open(fileobj=unzipped, mode="r|") as archive:
        contents = {member.name: archive.extractfile(member).read() for member in archive}
    assert contents == {"model.bin": noise, "table.csv": text}


def test_a_tree_deeper_than_the_system_can_name_fails_with_a_reason(tmp_path, output):
    nest(output, 2100, "deep.txt")  # "d/" * 2100 is longer than PATH_MAX
    with pytest.raises(output_archive.OutputUnreadable, match="it cannot read the output's d/d/d/.*File name too"):
        output_archive.pack_output(output, tmp_path / "out.tar.gz", max_bytes=1000)
    assert not (tmp_path / "out.tar.gz").exists()


def test_skipped_names_are_printable_and_few():
    note = skipped_note([f"link-{number}" for number in range(25)] + ["evil\n[site runner] all fine\x1b[2J"])
    assert note.startswith("not uploaded (links or special files): link-0, link-1, ")
    assert note.endswith("link-19 and 6 more")
    assert skipped_note(["evil\n[site runner] all fine\x1b[2J"]) == (
        "not uploaded (links or special files): evil?[site runner] all fine?[2J")


STRICT = [re.compile(r"registry\.example\.org/myconsortium/[a-z0-9-]+(:[\w.-]+)?")]


@pytest.mark.parametrize("image", [
    "evil.io/myconsortium/x",                          # the allowed path at another registry
    "registry.example.org/myconsortium/x.evil",        # the allowed name as the start of a longer one
    "registry.example.org/myconsortium/x/evil",        # below the allowed name
    "registry.example.org.evil.io/myconsortium/x",     # the allowed registry's name as a prefix
    "REGISTRY.EXAMPLE.ORG/myconsortium/x",             # the registry in upper case: another string
    "registry.example.org/MyConsortium/x",             # upper case in a path: not even a reference
    "myconsortium/x",                                  # no registry: that is Docker Hub
])
def test_lookalikes_of_an_allowed_image_are_refused(image):
    assert refusal_reason(image, STRICT) is not None


@pytest.mark.parametrize("image", [
    "registry.example.org/myconsortium/x", "registry.example.org/myconsortium/x:2.1"])
def test_the_allowed_image_itself_runs(image):
    assert refusal_reason(image, STRICT) is None
