"""Every bad field of a site config stops the runner at start-up with one line naming it and
the fix, including what only this machine can tell (the Docker engine, its networks, the
folders); the original PyTaskManager's field names are understood. tests/test_site_config.py
covers the first fields; this covers the rest, and the start-up checks against the machine."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client.site_config import CONTAINER_DEFAULTS, SPARQL_GATEWAY_DEFAULTS, ConfigError, parse_site_config
from tests.conftest import ROOT
from tests.test_site_config import VALID



def problems_with(**changes):
    raw = {key: value for key, value in {**VALID, **changes}.items() if value is not None}
    with pytest.raises(ConfigError) as caught:
        parse_site_config(raw)
    return caught.value.problems


@pytest.mark.parametrize("changes, expected", [
    ({"max_concurrent_runs": 0}, "max_concurrent_runs must be between 1 and 64, not 0"),
    ({"max_concurrent_runs": 2.5}, "max_concurrent_runs must be a int"),
    ({"long_poll_seconds": 600}, "long_poll_seconds must be between 0 and 120, not 600"),
    ({"poll_interval_seconds": 0}, "poll_interval_seconds must be between 0.1 and 3600, not 0"),
    ({"poll_interval_seconds": 0.05}, "poll_interval_seconds must be between 0.1 and 3600, not 0.05"),
    ({"poll_interval_seconds": float("nan")}, "poll_interval_seconds must be between 0.1 and 3600, not NaN"),
    ({"poll_interval_seconds": "5"}, 'poll_interval_seconds must be a float, not "5"'),
    ({"require_digest": "yes"}, 'require_digest must be a bool, not "yes"'),
    ({"work_dir": 7}, "work_dir must be a str, not 7"),
    ({"image_import_folder": ["a"]}, 'image_import_folder must be a str, not ["a"]'),
    ({"site_name": " "}, "site_name is empty"),
    ({"sparql_endpoint": "localhost:7878"}, "sparql_endpoint 'localhost:7878' must start with http://"),
    ({"sparql_endpoint": None}, "sparql_endpoint is missing"),
    ({"sparql_endpoint": "http://[::1/query"}, "sparql_endpoint 'http://[::1/query' must start with http:// or "
     "https://, then a host name or address (and a port number, if any)"),
    ({"registry_url": "http://127.0.0.1:port"}, "registry_url 'http://127.0.0.1:port' must start with http://"),
    ({"endpoint_type": 1}, "endpoint_type must be a str, not 1"),
    ({"whitelist": "one pattern"}, 'whitelist must be a list, not "one pattern"'),
    ({"container": "small"}, 'container must be a dict, not "small"'),
    ({"container": {"network": ""}}, "container.network is empty"),
    ({"container": {"memory": "1m"}}, "container.memory '1m' is below Docker's minimum of 6m"),
    ({"container": {"cpus": "two"}}, 'container.cpus must be a float, not "two"'),
    ({"container": {"timeout_seconds": 0}}, "container.timeout_seconds must be greater than 0"),
    ({"container": {"max_output_bytes": -1}}, "container.max_output_bytes must be at least 1048576 (1 MiB)"),
    ({"container": {"max_temp_files": 0}}, "container.max_temp_files must be greater than 0"),
    ({"container": {"disk_limits": "quota"}}, "container.disk_limits 'quota' must be filesystem"),
    ({"container": {"user": "root"}}, "container.user 'root' would run algorithms as root"),
    ({"container": {"user": "0:0"}}, "container.user '0:0' would run algorithms as root"),
])
def test_each_bad_field_is_named_with_its_fix(changes, expected):
    found = problems_with(**changes)
    assert any(expected in line for line in found), found


def test_every_problem_is_reported_at_once():
    found = problems_with(max_concurrent_runs=0, container={"pids": 0, "user": "root"}, colour="blue")
    assert len(found) == 4, found


def test_defaults_are_safe_and_documented():
    config = parse_site_config(VALID)
    assert (config.max_concurrent_runs, config.long_poll_seconds, config.poll_interval_seconds) == (1, 50, 5)
    assert config.site_name == socket.gethostname()
    assert config.image_import_folder is None and config.require_digest is True
    assert (config.endpoint_type, config.endpoint_token) == ("sparql", "")
    assert config.container.network == "none"


def test_the_poll_interval_may_be_a_fraction_of_a_second():
    assert parse_site_config({**VALID, "poll_interval_seconds": 0.2}).poll_interval_seconds == 0.2


def test_folders_are_relative_to_the_config_file(tmp_path):
    config = parse_site_config({**VALID, "work_dir": "work", "image_import_folder": "drop-images-here"},
                               base_dir=tmp_path)
    assert config.work_dir == tmp_path / "work"
    assert config.image_import_folder == tmp_path / "drop-images-here"


def test_original_pytaskmanager_field_names_are_aliases():
    raw = {**VALID, "masterUrl": "http://127.0.0.1:5001", "endpointUrl": "http://127.0.0.1:7879/query",
           "endpointType": "FHIR", "endpointToken": "secret", "interval": 10}
    del raw["registry_url"], raw["sparql_endpoint"]
    config = parse_site_config(raw)
    assert (config.registry_url, config.sparql_endpoint) == ("http://127.0.0.1:5001", "http://127.0.0.1:7879/query")
    assert (config.endpoint_type, config.endpoint_token, config.poll_interval_seconds) == ("FHIR", "secret", 10)


def test_alias_and_field_together_are_a_problem():
    assert any("registry_url is given twice (once as masterUrl)" in line
               for line in problems_with(masterUrl="http://127.0.0.1:5001"))


def test_original_pytaskmanager_config_says_what_to_remove():
    # The original client's config.json, with this runner's required additions.
    original = {"name": "My Name", "institute": "My Institute", "country": "International", "interval": 5,
                "endpointUrl": "http://localhost:7200/repositories/data/sparql", "endpointType": "FHIR",
                "masterUrl": "http://pbdw.personalhealthtrain.net", "dockerHost": "172.17.0.1",
                "email": "my@organization.tld", "endpointToken": "", "id": 3}
    with pytest.raises(ConfigError) as caught:
        parse_site_config({**original, "site_token": "pht_x", "whitelist": [".*"]})
    retired = ["country", "dockerHost", "email", "id", "institute", "name"]
    assert sorted(line.split(": ")[1].split(" ")[0] for line in caught.value.problems) == retired
    for line in caught.value.problems:
        assert "original PyTaskManager" in line and line.endswith("remove it")
    assert any("SPARQL gateway" in line for line in caught.value.problems if "dockerHost" in line)


def test_documentation_and_example_describe_every_field():
    text = (ROOT / "docs" / "site-config.md").read_text()
    top_level, _, rest = text.partition("`container` fields:")
    container_part = rest.partition("\n## ")[0]

    def fields_in(part):
        return set(re.findall(r"^\| `([a-zA-Z_]+)` \|", part, re.M))

    example = json.loads((ROOT / "config.json").read_text())
    assert fields_in(container_part) == set(CONTAINER_DEFAULTS)
    assert {key for key in example["container"] if not key.startswith("//")} == set(CONTAINER_DEFAULTS)
    gateway_part = text.partition("`sparql_gateway` fields")[2].partition("\n## ")[0]
    assert fields_in(gateway_part) == set(SPARQL_GATEWAY_DEFAULTS)
    assert {key for key in example["sparql_gateway"] if not key.startswith("//")} == set(SPARQL_GATEWAY_DEFAULTS)
    documented = fields_in(top_level)
    in_example = {key.removeprefix("//") for key in example if key != "//"}
    assert documented == in_example, documented ^ in_example
    for field in documented:
        # Each documented field is one the runner knows (a wrong value is another problem).
        try:
            parse_site_config({**VALID, field: ["?"]})
        except ConfigError as error:
            assert not any("unknown field" in line for line in error.problems), (field, error.problems)


# --- start-up: what only this machine can tell ----------------------------------------------

def start_runner(config_path, **environment):
    return subprocess.run([sys.executable, str(ROOT / "client" / "runScript.py"), "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **environment})


def write_config(folder, **changes):
    path = Path(folder) / "config.json"
    path.write_text(json.dumps({**VALID, **changes}))
    return path


def test_no_docker_engine_is_named(tmp_path):
    config = write_config(tmp_path, colour="blue")
    done = start_runner(config, DOCKER_HOST=f"unix://{tmp_path}/no-docker-here.sock")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[0] == f"{config}: unknown field 'colour'; see docs/site-config.md for the fields a site config has"
    assert lines[1].startswith(f"{config}: no Docker engine answers (")
    assert lines[1].endswith("start Docker, and make sure this user may use it")
    assert len(lines) == 2


def test_what_does_not_fit_this_machine_is_named(tmp_path):
    (tmp_path / "work").write_text("a file where the work folder should be")
    config = write_config(tmp_path, work_dir="work", image_import_folder="no-such-folder",
                          container={"network": "no-such-network", "cpus": 1000.0})
    done = start_runner(config)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == (f"{config}: container.network 'no-such-network' is not a Docker network on this machine; "
                        "create it (docker network create) or use none or host")
    assert lines[1].startswith(f"{config}: container.cpus 1000.0 is more than the ")
    assert lines[2].startswith(f"{config}: work_dir {tmp_path / 'work'} is not a folder this runner can write to")
    assert lines[3] == (f"{config}: image_import_folder {tmp_path / 'no-such-folder'} is not a folder; "
                        "create it, or leave the field out")
