"""The researcher library pins an image's tag to its digest when it posts a task, against the real Docker
engine and the image registry on the loopback address (with the engine's login, as scripts/setup.sh made it).

Every reference here names the local image registry: nothing is asked of Docker Hub.
"""

import pytest
from click.testing import CliRunner

from researcher import Registry
from researcher.__main__ import cli as researcher_cli
from researcher.images import ImageNotPinned, pin_to_digest
from scripts.federation import IMAGE_REGISTRY
from tests.images import built_test_image, engine_or_fail, pushed_test_image, registry_digest

MOVING_TAG = f"{IMAGE_REGISTRY}/pht/pin-test:moving"
UNKNOWN_TAG = f"{IMAGE_REGISTRY}/pht/pin-test:no-such-tag"
NO_ENGINE = "unix:///nonexistent/docker.sock"
FIX = ("give the image pinned by digest (name@sha256:...), or let this machine's Docker engine reach "
       f"{IMAGE_REGISTRY} (docker login), or pass pin_digest=False if every site accepts tags")


@pytest.fixture(scope="module")
def pushed():
    """An image of the tests' own, pushed to the image registry; its reference by tag."""
    engine_or_fail()
    return pushed_test_image("contract-probe", MOVING_TAG, VERSION="pinned")


# --- pin_to_digest -----------------------------------------------------------------------------

def test_a_tag_is_pinned_to_the_digest_the_image_registry_serves_for_it(pushed):
    assert pin_to_digest(pushed) == f"{pushed}@{registry_digest(pushed)}"


def test_a_tag_moved_later_changes_what_a_new_pin_names_and_not_what_an_old_one_does(pushed):
    first = pin_to_digest(pushed)
    built_test_image("contract-probe", MOVING_TAG, VERSION="moved")
    engine = engine_or_fail()
    for line in engine.images.push(MOVING_TAG, stream=True, decode=True):
        assert "error" not in line, f"pushing {MOVING_TAG} failed: {line['error']}"

    second = pin_to_digest(MOVING_TAG)

    assert second == f"{MOVING_TAG}@{registry_digest(MOVING_TAG)}" != first
    # The first pin still names the image it named when it was made.
    assert engine.images.get_registry_data(first).id == first.rpartition("@")[2]


def test_a_reference_pinned_already_is_left_as_it_is_without_asking_the_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    for pinned in (f"{IMAGE_REGISTRY}/pht/anything:1@sha256:{'a' * 64}",
                   f"{IMAGE_REGISTRY}/pht/anything@sha256:{'b' * 64}"):
        assert pin_to_digest(pinned) == pinned


def test_an_unknown_tag_is_an_error_that_names_the_ways_on(pushed):
    with pytest.raises(ImageNotPinned) as raised:
        pin_to_digest(UNKNOWN_TAG)
    assert str(raised.value).startswith(f"cannot pin {UNKNOWN_TAG} to a digest (the image registry has no such "
                                        "image or tag: ")
    assert str(raised.value).endswith(FIX)


def test_no_docker_engine_is_an_error_that_names_the_ways_on(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)
    with pytest.raises(ImageNotPinned) as raised:
        pin_to_digest(MOVING_TAG)
    assert "(no Docker engine answers here: " in str(raised.value)
    assert str(raised.value).endswith(FIX)


# --- Registry.submit and the CLI ---------------------------------------------------------------

@pytest.fixture
def token(make_researcher, make_site):
    make_site("hospital-a")
    return make_researcher("alice")["Authorization"].removeprefix("Bearer ")


def test_submit_posts_the_tag_pinned_to_its_digest(pushed, served_app, token):
    task = Registry(served_app, token).submit(pushed, {})
    assert task["image"] == f"{pushed}@{registry_digest(pushed)}"


def test_submit_without_pinning_posts_the_reference_as_written(served_app, token, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", NO_ENGINE)  # and does not need the engine
    assert Registry(served_app, token).submit(UNKNOWN_TAG, {}, pin_digest=False)["image"] == UNKNOWN_TAG


def test_submit_posts_a_pinned_reference_as_written(served_app, token):
    pinned = f"{UNKNOWN_TAG}@sha256:{'c' * 64}"
    assert Registry(served_app, token).submit(pinned, {})["image"] == pinned


def test_submit_of_a_tag_that_cannot_be_pinned_posts_nothing(pushed, served_app, token):
    registry = Registry(served_app, token)
    with pytest.raises(ImageNotPinned, match="pass pin_digest=False if every site accepts tags"):
        registry.submit(UNKNOWN_TAG, {})
    assert list(registry.tasks()) == []


def test_the_cli_pins_unless_told_not_to(pushed, served_app, token, tmp_path):
    def cli(*args):
        env = {"PHT_REGISTRY_URL": served_app, "PHT_TOKEN": token, "PHT_CONFIG": str(tmp_path / "none.toml"),
               "PHT_IDENTITY": None}
        return CliRunner().invoke(researcher_cli, ["submit", *args], env=env, catch_exceptions=False)

    pinned = cli(pushed)
    assert pinned.exit_code == 0, pinned.stderr
    assert pinned.stdout.strip().endswith(f"posted for hospital-a: {pushed}@{registry_digest(pushed)}")

    as_written = cli(UNKNOWN_TAG, "--no-pin")
    assert as_written.exit_code == 0, as_written.stderr
    assert as_written.stdout.strip().endswith(f"posted for hospital-a: {UNKNOWN_TAG}")

    refused = cli(UNKNOWN_TAG)
    assert refused.exit_code == 1
    assert refused.stderr.startswith(f"error: cannot pin {UNKNOWN_TAG} to a digest (")
    assert refused.stderr.endswith("or use --no-pin if every site accepts tags\n")
    assert refused.stderr.count("\n") == 1
