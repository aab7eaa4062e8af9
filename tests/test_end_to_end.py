"""The whole path with every real part: registry and runner processes, the Docker engine,
the image registry on 127.0.0.1:5050 and one Oxigraph SPARQL endpoint per site.

scripts/setup.sh (run by scripts/test.sh) starts the engine and image registry and
pushes the images these tests use.
"""

import docker
import pytest

from scripts.federation import IMAGE_REGISTRY, LocalFederation
from tests.images import engine_or_fail, present, registry_digest

PATIENT_COUNT = f"{IMAGE_REGISTRY}/pht/patient-count:latest"
# The same algorithm under a repository no site allows: a real, pullable image that must not be pulled.
UNTRUSTED = f"{IMAGE_REGISTRY}/untrusted/patient-count:latest"


@pytest.fixture(scope="module")
def engine():
    return engine_or_fail()


@pytest.fixture(scope="module")
def federation(engine):
    with LocalFederation(site_names=("hospital-a", "hospital-b"), patients_per_site=37) as fed:
        yield fed


def remove_local_image(engine, reference):
    try:
        engine.images.remove(reference, force=True)
    except docker.errors.ImageNotFound:
        pass


def test_each_site_counts_its_own_patients_over_sparql(engine, federation):
    remove_local_image(engine, PATIENT_COUNT)  # so the runner's pull is a real pull from the registry
    researcher = federation.researcher()
    task = researcher.submit(PATIENT_COUNT, {"label": "walking skeleton"})
    results = {r.site: r for r in researcher.wait_for_results(task["id"], timeout_seconds=120)}

    assert set(results) == {"hospital-a", "hospital-b"}
    for name, result in results.items():
        assert result.status == "completed", result.log
        assert result.exit_code == 0
        assert result.output == {
            "patient_count": len(federation.sites[name].patients), "label": "walking skeleton"}
        assert result.image_digest == registry_digest(PATIENT_COUNT)
        # A small input came with the claim, and the small output and log with the finish report: the site
        # asked for the input and sent the results by no request of their own (heartbeats aside).
        requests_for_run = [line.split(" -> ")[0].split(": ")[-1] for line in federation.log_of("registry").splitlines()
                            if f"/api/site/runs/{result.run_id}/" in line]
        assert [line for line in requests_for_run if not line.endswith("/heartbeat")] == [
            f"POST /api/site/runs/{result.run_id}/start", f"POST /api/site/runs/{result.run_id}/finish"]
    engine.images.get(task["image"])  # it was pulled back, by the digest the library pinned


def test_image_off_the_whitelist_is_neither_pulled_nor_run(engine, federation):
    image = engine.images.get(PATIENT_COUNT) if present(engine, PATIENT_COUNT) else engine.images.pull(PATIENT_COUNT)
    image.tag(UNTRUSTED)
    engine.images.push(UNTRUSTED)
    remove_local_image(engine, UNTRUSTED)

    researcher = federation.researcher()
    task = researcher.submit(UNTRUSTED, "{}")
    finished = researcher.wait(task["id"], timeout_seconds=60)

    for run in finished["runs"]:
        assert run["status"] == "refused"
        assert "whitelist" in run["reason"] and UNTRUSTED in run["reason"]
        assert run["image_digest"] is None and run["output_sha256"] is None
    assert not present(engine, UNTRUSTED), "the runner pulled an image its whitelist does not allow"
    assert not engine.containers.list(all=True, filters={"ancestor": UNTRUSTED})

