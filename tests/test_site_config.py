"""The site config: every bad field stops the runner with a line naming the field and the fix."""

import json
import subprocess
import sys

import pyrage
import pytest

from client.site_config import ConfigError, load_site_config, parse_site_config
from tests.conftest import ROOT

TTP_KEY = str(pyrage.x25519.Identity.generate().to_public())

VALID = {
    "registry_url": "http://127.0.0.1:5000",
    "site_token": "pht_secret",
    "sparql_endpoint": "http://127.0.0.1:7878/query",
    "whitelist": [r"127\.0\.0\.1:5050/pht/.*"],
}


def problems_with(**changes):
    raw = {**VALID, **changes}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_site_config(raw)
    return caught.value.problems


def test_valid_config_gets_contained_defaults():
    config = parse_site_config(VALID)
    assert config.container.network == "none"
    assert config.container.user == "65534:65534"
    assert config.whitelist[0].pattern == r"127\.0\.0\.1:5050/pht/.*"


@pytest.mark.parametrize("changes, expected", [
    ({"whitelist": ["ok", "(unclosed"]}, "whitelist[1] is not a valid regular expression"),
    ({"whitelist": []}, "whitelist is empty"),
    ({"whitelist": None}, "whitelist is missing"),
    ({"registry_url": "ftp://x"}, "registry_url 'ftp://x' must start with http:// or https://"),
    ({"registry_url": None}, "registry_url is missing"),
    ({"site_token": None}, "site_token is missing"),
    ({"site_token_env": "PHT_TOKEN_THAT_IS_NOT_SET"}, "give site_token or site_token_env, not both"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"long_poll_seconds": "30"}, "long_poll_seconds must be a int"),
    ({"container": {"memory": "lots"}}, "container.memory 'lots' must look like 512m or 2g"),
    ({"container": {"pids": 0}}, "container.pids must be greater than 0"),
    ({"container": {"gpu": True}}, "container.gpu is not a container setting"),
    ({"recipients": {"ttp": {"url": "http://127.0.0.1:5001", "public_key": "age1nope", "token": "t"}}},
     "recipients.ttp.public_key: 'age1nope' is not an age public key"),
    ({"recipients": {"ttp": {"url": "ftp://x", "public_key": TTP_KEY, "token": "t"}}}, "recipients.ttp.url must be"),
    ({"recipients": {"ttp": {"url": "http://127.0.0.1:5001", "public_key": TTP_KEY}}}, "recipients.ttp.token is missing"),
    ({"recipients": {"ttp": {"url": "http://x", "public_key": TTP_KEY, "token": "t", "key": 1}}},
     "recipients.ttp: unknown field(s) key"),
    ({"recipients": {"../ttp": {}}}, "recipients.../ttp: a recipient's name may have"),
])
def test_each_bad_field_is_named(changes, expected):
    found = problems_with(**changes)
    assert any(expected in line for line in found), found


def test_token_from_environment_variable(monkeypatch):
    monkeypatch.setenv("PHT_SITE_TOKEN", "pht_from_env")
    raw = {**VALID, "site_token_env": "PHT_SITE_TOKEN"}
    del raw["site_token"]
    assert parse_site_config(raw).site_token == "pht_from_env"


def test_unset_token_variable_is_named():
    raw = {**VALID, "site_token_env": "PHT_TOKEN_THAT_IS_NOT_SET"}
    del raw["site_token"]
    with pytest.raises(ConfigError, match="PHT_TOKEN_THAT_IS_NOT_SET"):
        parse_site_config(raw)


def test_original_pytaskmanager_names_are_accepted():
    raw = {**VALID, "masterUrl": "http://127.0.0.1:5000", "endpointUrl": "http://127.0.0.1:7878/query"}
    del raw["registry_url"], raw["sparql_endpoint"]
    config = parse_site_config(raw)
    assert config.registry_url == "http://127.0.0.1:5000"


def test_recipients_keep_their_pinned_keys():
    config = parse_site_config({**VALID, "recipients": {
        "ttp": {"url": "https://ttp.example.org", "public_key": TTP_KEY, "token": "pht_fs_x"}}})
    assert config.recipients["ttp"].public_key == TTP_KEY


def test_comment_keys_are_ignored():
    assert parse_site_config({**VALID, "//whitelist": "explains the whitelist"})


def test_example_config_in_the_repository_is_valid(monkeypatch):
    monkeypatch.setenv("PHT_SITE_TOKEN", "pht_example")
    config = load_site_config(ROOT / "config.json")
    assert config.container.network == "none"


def test_runner_exits_with_one_line_per_problem(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({**VALID, "whitelist": ["("], "colour": "blue"}))
    done = subprocess.run([sys.executable, str(ROOT / "client" / "runScript.py"), "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [f"{bad}: whitelist[0] is not a valid regular expression: missing ), unterminated subpattern at position 0",
                     f"{bad}: unknown field 'colour'; see docs/site-config.md for the fields a site config has"]
