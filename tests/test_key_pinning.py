"""Keys pinned at the site (researcher_keys): a compromised registry can neither add a reader of a
researcher's results nor strip their encryption. The registry here is real; where it turns hostile,
the test writes into its database what a compromised registry would."""

import pytest
import sqlalchemy as sa

from master import store
from researcher import Registry, generate_identity
from scripts.federation import IMAGE_REGISTRY, LocalFederation
from tests.images import engine_or_fail, only_run
from tests.registry_storage import stored_results

SITE = "hospital-a"
RESEARCHER = "researcher"  # the name LocalFederation registers its researcher under
PATIENT_COUNT = f"{IMAGE_REGISTRY}/pht/patient-count:latest"
AGE_HEADER = b"age-encryption.org/v1\n"


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    path = tmp_path_factory.mktemp("researcher") / "identity.txt"
    return path, generate_identity(path)


@pytest.fixture(scope="module")
def federation(identity):
    engine_or_fail()
    _path, public_key = identity
    with LocalFederation(site_names=(SITE,), patients_per_site=11,
                         site_settings={"researcher_keys": {RESEARCHER: [public_key]}}) as federation:
        federation.researcher().register_public_key(public_key)
        yield federation


@pytest.fixture
def registry_key(federation, tmp_path):
    """The registry slips a key of its own in among the researcher's; taken out again afterwards."""
    key = generate_identity(tmp_path / "registry-identity.txt")
    engine = sa.create_engine(f"sqlite:///{federation.registry_data / 'registry.sqlite'}")
    with engine.connect() as conn:
        researcher_id = conn.execute(sa.select(store.researchers.c.id).where(
            store.researchers.c.name == RESEARCHER)).scalar_one()
    key_id = store.add_researcher_key(engine, researcher_id, key)
    yield key
    store.remove_researcher_key(engine, researcher_id, key_id)
    engine.dispose()


def stored_blobs(federation):
    return stored_results(federation.registry_data)


def test_a_key_the_registry_added_is_refused_and_nothing_leaves(federation, registry_key):
    blobs_before = stored_blobs(federation)
    task = federation.researcher().submit(PATIENT_COUNT, {"label": "secret"}, encrypt=True)
    assert registry_key in task["encrypted_to"]  # the claim will carry it too

    run = only_run(federation, task)
    assert run["status"] == "refused"
    assert f"researcher {RESEARCHER!r}" in run["reason"] and registry_key in run["reason"], run["reason"]
    assert (run["output_sha256"], run["log_sha256"]) == (None, None)
    assert stored_blobs(federation) == blobs_before  # nothing was uploaded, readable to that key or not


def test_a_task_stripped_of_its_keys_is_still_encrypted_to_the_pinned_ones(federation, identity):
    identity_file, _public_key = identity
    # Posted without encryption: what the site sees when a registry drops the keys from a claim.
    task = federation.researcher().submit(PATIENT_COUNT, {"label": "stripped"})
    assert task["encrypted_to"] == []

    run = only_run(federation, task)
    assert run["status"] == "completed", run["reason"]
    blobs = stored_blobs(federation)
    for sha256 in (run["output_sha256"], run["log_sha256"]):
        assert blobs[sha256].startswith(AGE_HEADER)  # the registry holds ciphertext only
        assert b"patient_count" not in blobs[sha256] and b"11 patients" not in blobs[sha256]
    result = Registry(federation.registry_url, federation.researcher_token, identity_file=identity_file).result(
        run, encrypted=True)
    assert result.output == {"patient_count": 11, "label": "stripped"}
