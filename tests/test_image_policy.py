import re

import pytest

from client.image_policy import InvalidReference, parse_image_reference, refusal_reason


def whitelist(*patterns):
    return [re.compile(p) for p in patterns]


@pytest.mark.parametrize("written, normalised", [
    ("ubuntu", "docker.io/library/ubuntu:latest"),
    ("myconsortium/x:1.0", "docker.io/myconsortium/x:1.0"),
    ("127.0.0.1:5050/pht/count:latest", "127.0.0.1:5050/pht/count:latest"),
    ("localhost/pht/count", "localhost/pht/count:latest"),
    ("registry.example.org/a/b/c:v2", "registry.example.org/a/b/c:v2"),
    ("r.example.org/a@sha256:" + "a" * 64, "r.example.org/a@sha256:" + "a" * 64),
    ("r.example.org/a:1@sha256:" + "b" * 64, "r.example.org/a:1@sha256:" + "b" * 64),
])
def test_references_normalise_like_docker(written, normalised):
    assert parse_image_reference(written).normalised == normalised


@pytest.mark.parametrize("written", [
    "", "UPPER/case", "a//b", "image:", ":tag", "image@sha256:short", "-leading/x", "a b", "x:tag:tag",
])
def test_malformed_references_do_not_parse(written):
    with pytest.raises(InvalidReference):
        parse_image_reference(written)


CONSORTIUM = whitelist(r"myconsortium/.*")


@pytest.mark.parametrize("image", ["myconsortium/x", "myconsortium/x:1"])
def test_whitelisted_images_are_allowed(image):
    assert refusal_reason(image, CONSORTIUM) is None


@pytest.mark.parametrize("image", [
    "evil.io/myconsortium/x",          # same path on another registry
    "myconsortium/x.evil",             # allowed name as a prefix of a longer one
    "notmyconsortium/x",               # longer owner name ending in the allowed one
    "MyConsortium/x",                  # upper case: not a valid reference at all
    "evil/myconsortium/x",             # allowed path nested under another owner
])
def test_lookalike_images_are_refused(image):
    strict = whitelist(r"myconsortium/x(:[\w.-]+)?")
    assert refusal_reason(image, strict) is not None


def test_pattern_must_match_whole_reference_not_a_prefix():
    assert refusal_reason("myconsortium/x.evil", whitelist(r"myconsortium/x")) is not None
    assert refusal_reason("myconsortium/x", whitelist(r"myconsortium/x")) is None


def test_registry_prefix_in_pattern_matches_normalised_form():
    allow = whitelist(r"docker\.io/library/ubuntu:.*")
    assert refusal_reason("ubuntu", allow) is None
    assert refusal_reason("ubuntu:22.04", allow) is None
    assert refusal_reason("evil.io/library/ubuntu:22.04", allow) is not None


def test_refusal_reason_names_the_image_and_the_whitelist():
    reason = refusal_reason("evil.io/x", CONSORTIUM)
    assert "evil.io/x" in reason and "whitelist" in reason


def test_unparseable_reference_is_refused_with_reason():
    assert "not a valid image reference" in refusal_reason("UPPER/x", whitelist(".*"))


def test_require_digest_refuses_tag_only_references():
    allow = whitelist(r".*")
    assert "digest" in refusal_reason("myconsortium/x:1", allow, require_digest=True)
    assert refusal_reason("myconsortium/x@sha256:" + "c" * 64, allow, require_digest=True) is None
    assert refusal_reason("myconsortium/x:1@sha256:" + "c" * 64, allow, require_digest=True) is None


def test_the_whitelist_is_checked_before_the_digest():
    reason = refusal_reason("evil.io/x:1", whitelist(r"myconsortium/.*"), require_digest=True)
    assert "matches no entry of this site's whitelist" in reason
