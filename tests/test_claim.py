"""A claim from a possibly compromised registry, checked before the runner acts on it (client/claim.py),
and the keys the site encrypts to (client/encryption.keys_for): pure decisions, no servers."""

import base64

import pytest

from client.claim import Claim, InvalidClaim, parse_claim
from client.encryption import keys_for
from client.site_config import ConfigError, parse_site_config
from common.names import MAX_INLINE_BYTES
from researcher import generate_identity

GOOD = {"id": 7, "task_id": 5, "session_id": 3, "image": "127.0.0.1:5050/pht/x:1", "lease_id": "a1_b-2",
        "lease_seconds": 60, "timeout_seconds": None, "recipients": [], "name": None, "researcher": "alice"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return [generate_identity(folder / f"identity-{n}.txt") for n in range(3)]


def test_a_good_claim_becomes_a_typed_claim_and_unknown_fields_are_ignored():
    claim = parse_claim({**GOOD, "added_by_a_newer_registry": {"x": 1}})
    assert claim == Claim(id=7, task_id=5, session_id=3, image="127.0.0.1:5050/pht/x:1", lease_id="a1_b-2",
                          lease_seconds=60, timeout_seconds=None, recipients=(), name=None, researcher="alice")
    assert parse_claim(claim.as_dict()) == claim  # what the run folder keeps reads back the same


@pytest.mark.parametrize("field, value", [
    ("id", "../../x"), ("id", "/abs/path"), ("id", -1), ("id", 0), ("id", 2 ** 40), ("id", 1.5), ("id", True),
    ("id", None), ("id", "7"), ("session_id", "../../x"), ("session_id", "3/temp"), ("task_id", [1]),
    ("lease_id", "a\r\nX-Injected: 1"), ("lease_id", "a/b"), ("lease_id", ""), ("lease_id", "x" * 65),
    ("lease_seconds", None), ("lease_seconds", 0), ("lease_seconds", 10 ** 9), ("timeout_seconds", -5),
    ("image", 123), ("image", "x" * 10_000), ("image", "Not An Image!"), ("image", "pht/x:1\n"),
    ("recipients", "age1x"), ("recipients", ["not-a-key"]), ("recipients", [None]), ("name", 5),
    ("name", "n" * 1000), ("researcher", ""), ("researcher", 12),
    ("input_base64", 12), ("input_base64", "not base64!"), ("input_base64", "QUJD\n"), ("input_base64", "QUJ"),
    ("input_base64", base64.b64encode(bytes(MAX_INLINE_BYTES + 1)).decode()),
    ("inline_result_bytes", -1), ("inline_result_bytes", MAX_INLINE_BYTES + 1), ("inline_result_bytes", 2 ** 40),
    ("inline_result_bytes", str(MAX_INLINE_BYTES)),
])
def test_a_malformed_field_makes_the_claim_invalid_and_says_which(field, value):
    with pytest.raises(InvalidClaim) as caught:
        parse_claim({**GOOD, field: value})
    assert caught.value.problems[0].startswith(f"{field} ")
    # Refusable at the registry exactly when the run's id and lease are themselves valid.
    assert caught.value.refusable == (field not in ("id", "lease_id"))


def test_results_go_within_the_finish_report_only_as_large_as_the_claim_says_and_never_larger_than_48_kib():
    assert parse_claim(GOOD).inline_result_bytes == 0  # a registry before API 1.4
    claim = parse_claim({**GOOD, "inline_result_bytes": MAX_INLINE_BYTES})
    assert claim.inline_result_bytes == MAX_INLINE_BYTES
    assert parse_claim(claim.as_dict()) == claim  # the run folder keeps it, for a report after a restart


def test_an_input_in_the_claim_is_its_bytes_and_is_not_kept_with_the_claim():
    claim = parse_claim({**GOOD, "input_base64": "AP8NCnsieCI6IDF9"})
    assert claim.input == b"\x00\xff\r\n{\"x\": 1}"
    assert "input" not in claim.as_dict() and "input_base64" not in claim.as_dict()  # the run folder has input.txt
    assert parse_claim(claim.as_dict()).input is None
    assert parse_claim({**GOOD, "input_base64": ""}).input == b""
    assert parse_claim({**GOOD, "input_base64": None}).input is None  # not sent: the runner downloads it
    biggest = base64.b64encode(bytes(MAX_INLINE_BYTES)).decode()
    assert len(parse_claim({**GOOD, "input_base64": biggest}).input) == MAX_INLINE_BYTES


@pytest.mark.parametrize("field", ["id", "task_id", "session_id", "image", "lease_id", "lease_seconds"])
def test_a_missing_field_makes_the_claim_invalid(field):
    with pytest.raises(InvalidClaim, match=f"{field} is missing"):
        parse_claim({key: value for key, value in GOOD.items() if key != field})


@pytest.mark.parametrize("raw", [[], "claim", None, 7, [GOOD]])
def test_a_claim_that_is_not_an_object_is_invalid_and_cannot_be_refused(raw):
    with pytest.raises(InvalidClaim) as caught:
        parse_claim(raw)
    assert not caught.value.refusable


def test_a_hostile_value_is_quoted_printable_and_short():
    with pytest.raises(InvalidClaim) as caught:
        parse_claim({**GOOD, "image": "\x1b]0;owned\x07" + "x" * 500})
    message = str(caught.value)
    assert "\x1b" not in message and "\x07" not in message and len(message) < 200


def test_without_pinning_the_registrys_keys_are_used_as_they_are(keys):
    claim = parse_claim({**GOOD, "recipients": keys[:2]})
    assert keys_for(claim, None) == (tuple(keys[:2]), None)
    assert keys_for(parse_claim(GOOD), None) == ((), None)


def test_with_pinning_a_key_the_site_did_not_pin_refuses_the_run(keys):
    pinned = {"alice": (keys[0],)}
    added_by_the_registry = parse_claim({**GOOD, "recipients": [keys[0], keys[2]]})
    encrypt_to, refusal = keys_for(added_by_the_registry, pinned)
    assert encrypt_to == ()
    assert "'alice'" in refusal and keys[2] in refusal and "researcher_keys" in refusal
    # Another researcher's pinned key is not alice's.
    assert keys_for(parse_claim({**GOOD, "recipients": [keys[1]]}), {**pinned, "bob": (keys[1],)})[1]


def test_with_pinning_the_pinned_keys_are_used_even_when_the_claim_drops_them(keys):
    pinned = {"alice": (keys[0], keys[1])}
    assert keys_for(parse_claim({**GOOD, "recipients": []}), pinned) == ((keys[0], keys[1]), None)
    assert keys_for(parse_claim({**GOOD, "recipients": [keys[1]]}), pinned) == ((keys[0], keys[1]), None)
    # A researcher the site pins nothing for gets what they asked: no encryption.
    assert keys_for(parse_claim({**GOOD, "researcher": "carol"}), pinned) == ((), None)


def test_with_pinning_a_claim_that_does_not_say_whose_it_is_is_refused(keys):
    claim = parse_claim({key: value for key, value in GOOD.items() if key != "researcher"})
    assert "did not say whose task" in keys_for(claim, {"alice": (keys[0],)})[1]


def test_the_site_config_checks_pinned_keys(keys):
    site = {"registry_url": "http://127.0.0.1:5000", "site_token": "pht_x", "sparql_endpoint": "http://127.0.0.1:1/q",
            "whitelist": [".*"]}
    assert parse_site_config(site).researcher_keys is None
    config = parse_site_config({**site, "researcher_keys": {"alice": keys[0], "bob": [keys[1], keys[2]]}})
    assert config.researcher_keys == {"alice": (keys[0],), "bob": (keys[1], keys[2])}
    with pytest.raises(ConfigError) as caught:
        parse_site_config({**site, "researcher_keys": {"alice": ["age1nope"], "bob": []}})
    assert any("researcher_keys.alice" in line for line in caught.value.problems)
    assert any("researcher_keys.bob must be" in line for line in caught.value.problems)
