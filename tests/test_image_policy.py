import json
import re

import pytest

from client.image_policy import InvalidReference, overbroad_patterns, parse_image_reference, refusal_reason
from tests.conftest import ROOT


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


# --- whitelist patterns that admit more than they seem to ----------------------------------------------------

CONFIG_EXAMPLE = json.loads((ROOT / "config.json").read_text())["whitelist"]


@pytest.mark.parametrize("pattern, says", [
    (r".*", "admits images from any registry, such as attacker.invalid/x:"),
    (r".+", "admits images from any registry"),
    (r"^.*$", "admits images from any registry"),
    (r".*/pht/summary(:[\w.-]+)?", "admits images from any registry, such as attacker.invalid/x/pht/summary:"),
    (r"[a-z0-9.:-]+/pht/summary", "admits images from any registry, such as attacker.invalid/pht/summary:"),
    (r"[^/]+/pht/.*", "admits images from any registry"),
    (r"127.0.0.1:5050/pht/summary(:[\w.-]+)?", "admits look-alike registries, such as 127x0.0.1:5050/pht/summary:"),
    (r"registry.example.org/pht/(summary|logreg)", "admits look-alike registries, such as "
                                                    "registryxexample.org/pht/summary:"),
    (r"127\.0\.0\.1:5050/.*", "admits any repository on 127.0.0.1:5050, nested ones too, such as "
                              "127.0.0.1:5050/someone-else/x:"),
    (r"127\.0\.0\.1:5050/pht/.*", "admits repositories nested below 127.0.0.1:5050/pht/, such as "
                                  "127.0.0.1:5050/pht/someone-else/x:"),
    (r"127\.0\.0\.1:5050/pht/.*@sha256:[0-9a-f]{64}", "admits repositories nested below 127.0.0.1:5050/pht/"),
    (r"127\.0\.0\.1:5050/pht/[^:@]+(:.*)?", "admits repositories nested below 127.0.0.1:5050/pht/"),
    (r"127\.0\.0\.1:5050/pht/summary.*", "admits repositories nested below 127.0.0.1:5050/pht/summary/, such as "
                                         "127.0.0.1:5050/pht/summary/someone-else:"),
    (r"(127\.0\.0\.1:5050|registry\.example\.org)/pht/.*", "admits repositories nested below 127.0.0.1:5050/pht/"),
    (r"(?i)127\.0\.0\.1:5050/PHT/.*", "admits repositories nested below 127.0.0.1:5050/pht/"),
    (r"myconsortium/.*", "admits repositories nested below myconsortium/, such as myconsortium/someone-else/x:"),
])
def test_overbroad_patterns_are_named_with_an_image_they_admit_and_the_fix(pattern, says):
    [(named, why)] = overbroad_patterns([pattern])
    assert named == pattern
    assert why.startswith(says), why
    admitted = re.search(r"such as (\S+):", why)[1]
    assert refusal_reason(admitted, whitelist(pattern)) is None, "the image named is one the site would run"
    assert any(fix in why for fix in ("escape", "begin it with", "name each repository", "name the repositories"))


@pytest.mark.parametrize("pattern", [
    *CONFIG_EXAMPLE,
    r"127\.0\.0\.1:5050/pht/summary(:[\w.-]+)?(@sha256:[0-9a-f]{64})?",
    r"127\.0\.0\.1:5050/pht/summary@sha256:[0-9a-f]{64}",
    r"127\.0\.0\.1:5050/pht/summary:.*",
    r"127\.0\.0\.1:5050/pht/\w+(:\w+)?",
    r"(127\.0\.0\.1:5050|registry\.example\.org)/pht/(summary|logreg)(@sha256:[0-9a-f]{64})?",
    r"registry\.example\.org/pht/[a-z0-9-]+:[\w.-]+@sha256:[0-9a-f]{64}",
    r"(?i)127\.0\.0\.1:5050/PHT/summary",
    r"myconsortium/x(:[\w.-]+)?",
    r"docker\.io/library/ubuntu:.*",
    r"ubuntu",
])
def test_tight_patterns_are_not_warned_of(pattern):
    assert overbroad_patterns([pattern]) == []


def test_overbroad_patterns_keeps_the_order_and_takes_compiled_patterns():
    patterns = [re.compile(CONFIG_EXAMPLE[0]), ".*", re.compile(r"127\.0\.0\.1:5050/pht/.*")]
    assert [pattern for pattern, _ in overbroad_patterns(patterns)] == [".*", r"127\.0\.0\.1:5050/pht/.*"]


def test_a_pattern_that_admits_no_valid_reference_is_not_warned_of():
    assert overbroad_patterns([r"\x1b\[2J.*", r"NOT/LOWERCASE/.*", r"a{100000}"]) == []


def test_the_documented_examples_are_what_the_check_finds():
    section = (ROOT / "docs" / "site-config.md").read_text().partition(
        "## Whitelist patterns that admit more than they seem to")[2].partition("\n## ")[0]
    rows = re.findall(r"^\| (`.*?) \| (.*?) \| (.*) \|$", section, re.M)
    says = {"any registry": "admits images from any registry", "look-alike registries": "admits look-alike registries",
            "any repository on that registry, nested ones too": "admits any repository on ",
            "repositories nested below a trusted path": "admits repositories nested below "}
    assert [warned_of for _, warned_of, _ in rows] == list(says)
    for cells, warned_of, examples in rows:
        patterns = re.findall(r"`([^`]+)`", cells)
        for pattern in patterns:
            [(_, why)] = overbroad_patterns([pattern])
            assert why.startswith(says[warned_of]), (pattern, why)
        for example in re.findall(r"`([^`]+)`", examples):
            assert any(refusal_reason(example, whitelist(pattern)) is None for pattern in patterns), example
    tight = json.loads("{" + section.partition("```json\n")[2].partition("\n```")[0] + "}")["whitelist"]
    assert len(tight) == 2 and overbroad_patterns(tight) == []


def test_nested_repeats_make_no_example_longer_than_a_claims_image():
    """(((x{200}){200}){200}){200} would be 1.6e9 characters: made up whole, it stopped the runner at start-up with
    a MemoryError. Three levels (8e6 characters) show the cap without the memory."""
    import re
    from client import image_policy
    for pattern in (r"((x{200}){200}){200}", r"127\.0\.0\.1:5050/pht/(?:(?:[a-z]{200}){200}){200}"):
        examples = image_policy._examples(re.compile(pattern))
        assert all(len(example) <= image_policy.MAX_EXAMPLE_CHARS for example in examples)
    assert image_policy.overbroad_patterns([r"(((x{200}){200}){200}){200}"]) == []


def test_a_whitelist_pattern_that_cannot_be_checked_is_a_warning_not_a_stop(monkeypatch):
    import re
    from client import image_policy
    from client.runner import whitelist_warnings

    def broken(patterns):
        raise RecursionError("the parser gave up")
    monkeypatch.setattr(image_policy, "overbroad_patterns", broken)
    assert whitelist_warnings([re.compile("x")]) == [
        'whitelist[0] "x" could not be checked for being too broad (RecursionError); read docs/site-config.md on '
        "tight patterns"]
