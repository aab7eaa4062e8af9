"""Which image runs: the whitelist against lookalike names (real, pullable images that must not
be pulled), require_digest, always pulling and running by the pulled digest, and images an
air-gapped site's operator drops into the import folder."""

import time

import pytest

from client import containers

from scripts.federation import IMAGE_REGISTRY, LocalFederation, free_port
from tests.images import (built_test_image, engine_or_fail, only_run, output_json, present, pushed_test_image,
                          registry_digest)

OPEN_SITE, STRICT_SITE = "hospital-a", "hospital-b"
PROBE = f"{IMAGE_REGISTRY}/pht/contract-probe"
# Nothing listens here: an image named after this registry can only come from the import folder.
AIR_GAP_REGISTRY = f"127.0.0.1:{free_port()}"
IMPORTED = f"{AIR_GAP_REGISTRY}/pht/imported-probe"
WHITELIST = [
    r"127\.0\.0\.1:5050/pht/(contract-probe|pinning-probe)(:[\w.-]+)?(@sha256:[0-9a-f]{64})?",
    AIR_GAP_REGISTRY.replace(".", r"\.") + r"/pht/imported-probe(:[\w.-]+)?(@sha256:[0-9a-f]{64})?",
]


@pytest.fixture(scope="module")
def engine():
    engine = engine_or_fail()
    yield engine
    # The air-gapped registry's port differs each time: do not let its images pile up.
    for image in engine.images.list():
        for tag in image.tags:
            if tag.startswith(AIR_GAP_REGISTRY + "/"):
                engine.images.remove(tag)


@pytest.fixture(scope="module")
def federation(engine):
    with LocalFederation(site_names=(OPEN_SITE, STRICT_SITE), patients_per_site=5, container_network="none",
                         whitelist=WHITELIST, start_runners=False) as federation:
        imports = federation.folder / "imports"
        imports.mkdir()
        # The open site runs tags too: these tests are about references exactly as written.
        federation.configure_site(OPEN_SITE, image_import_folder=str(imports), require_digest=False)
        federation.configure_site(STRICT_SITE, require_digest=True)
        for site in federation.sites:
            federation.start_runner(site)
        yield federation


def forget_locally(engine, reference):
    if present(engine, reference):
        engine.images.remove(reference, force=True)


def run_at(federation, site, image, task_input="{}"):
    return only_run(federation, federation.researcher().submit(image, task_input, sites=[site], pin_digest=False))


@pytest.mark.parametrize("lookalike", [
    f"{PROBE}.evil:latest",                          # the allowed name as the start of a longer one
    f"{IMAGE_REGISTRY}/evil/pht/contract-probe:latest",  # the allowed path nested under another one
    f"{PROBE}-evil:latest",                          # the allowed name with a suffix
    f"{PROBE}/evil:latest",                          # a repository below the allowed one
    "localhost:5050/pht/contract-probe:latest",      # the same registry spelled another way
    "pht/contract-probe:latest",                     # no registry: Docker Hub's pht/contract-probe
    "LOCALHOST:5050/pht/contract-probe:latest",      # upper case: another string, whatever DNS thinks
])
def test_lookalike_image_is_refused_and_never_pulled(federation, engine, lookalike):
    probe = pushed_test_image("contract-probe")
    if lookalike.startswith(IMAGE_REGISTRY):
        # A real image under the lookalike name, so a pull would succeed if one were tried.
        engine.images.get(probe).tag(lookalike)
        engine.images.push(lookalike)
    forget_locally(engine, lookalike)

    run = run_at(federation, OPEN_SITE, lookalike)

    assert run["status"] == "refused"
    assert "whitelist" in run["reason"] and repr(lookalike) in run["reason"]
    assert run["image_digest"] is None
    assert not present(engine, lookalike), "the runner pulled an image its whitelist does not allow"


def test_require_digest_refuses_a_tag_and_runs_a_digest(federation):
    probe = pushed_test_image("contract-probe")
    tagged = run_at(federation, STRICT_SITE, probe)
    assert tagged["status"] == "refused"
    assert "only images pinned by digest" in tagged["reason"]

    digest = registry_digest(probe)
    pinned = run_at(federation, STRICT_SITE, f"{PROBE}@{digest}")
    assert pinned["status"] == "completed", pinned["reason"]
    assert pinned["image_digest"] == digest


def test_image_is_pulled_every_time_and_run_by_the_pulled_digest(federation, engine):
    tag = f"{IMAGE_REGISTRY}/pht/pinning-probe:latest"
    first = pushed_test_image("contract-probe", tag, VERSION="first")
    first_digest = registry_digest(first)
    task = federation.researcher().submit(tag, {"sleep": 3}, sites=[OPEN_SITE], pin_digest=False)
    container = wait_for_container_of(engine, task)
    # Created from name@digest, not from the tag: moving the tag now cannot change what runs.
    assert container.attrs["Config"]["Image"] == f"{IMAGE_REGISTRY}/pht/pinning-probe@{first_digest}"
    run = only_run(federation, task)
    assert run["image_digest"] == first_digest
    assert output_json(federation, run, "seen.json")["probe_version"] == "first"

    # The tag moves at the registry; the site's next run pulls and runs the new image.
    built_test_image("contract-probe", tag, VERSION="second")
    engine.images.push(tag)
    second_digest = registry_digest(tag)
    assert second_digest != first_digest
    engine.images.get(first).tag(tag)  # locally the tag still names the old image: only a pull finds the new one
    run = run_at(federation, OPEN_SITE, tag)
    assert run["image_digest"] == second_digest
    assert output_json(federation, run, "seen.json")["probe_version"] == "second"


def wait_for_container_of(engine, task, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [container for container in engine.containers.list(filters={"label": f"{containers.TASK_LABEL}={task['id']}"})
                 if containers.ROLE_LABEL not in container.labels]  # the algorithm's, not its SPARQL relay
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no container of task {task['id']} within {timeout} s")


def save_archive(engine, reference, destination):
    """`docker save REFERENCE`, written under a temporary name and then renamed, as an operator should."""
    partial = destination.with_name(destination.name + ".partial")
    with open(partial, "wb") as archive:
        for chunk in engine.api.get_image(reference):
            archive.write(chunk)
    partial.rename(destination)


def test_image_from_the_import_folder_runs_with_no_registry_reachable(federation, engine):
    imports = federation.folder / "imports"
    image = built_test_image("contract-probe", f"{IMPORTED}:1", VERSION="imported")
    save_archive(engine, f"{IMPORTED}:1", imports / "imported-probe.tar")
    engine.images.remove(image.id, force=True)  # only the archive has it now
    (imports / "half-copied.tar").write_bytes(b"not a docker save archive")

    run = run_at(federation, OPEN_SITE, f"{IMPORTED}:1")

    assert run["status"] == "completed", run["reason"]
    assert run["image_digest"] == image.id  # pinned by content: the archive has no registry digest
    assert output_json(federation, run, "seen.json")["probe_version"] == "imported"
    assert not (imports / "imported-probe.tar").exists()  # loaded, so removed
    assert (imports / "half-copied.tar").exists()  # not loaded, so kept for the operator
    assert "half-copied.tar could not be loaded" in federation.log_of(f"{OPEN_SITE}-runner")
    # By image id, pinned as a digest reference.
    by_digest = run_at(federation, OPEN_SITE, f"{IMPORTED}@{image.id}")
    assert by_digest["status"] == "completed", by_digest["reason"]


def test_imported_image_is_still_subject_to_the_whitelist(federation, engine):
    imports = federation.folder / "imports"
    untrusted = f"{AIR_GAP_REGISTRY}/untrusted/probe:1"
    built_test_image("contract-probe", untrusted, VERSION="untrusted")
    save_archive(engine, untrusted, imports / "untrusted.tar")
    engine.images.remove(untrusted, force=True)

    run = run_at(federation, OPEN_SITE, untrusted)

    assert run["status"] == "refused"
    assert "whitelist" in run["reason"]
    assert run["image_digest"] is None
