"""The site runner's pure decisions, without servers: time limits, output limits, what a
container is told, and the whitelist against the lookalike names the issue lists."""

import re
from pathlib import Path

import pytest

from client import output_archive
from client.claim import parse_claim
from client.image_policy import refusal_reason
from client.runner import container_environment, progress_of, shortened, timeout_for, timeout_reason
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
