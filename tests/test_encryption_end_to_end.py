"""End-to-end encryption on a real federation: the registry stores ciphertext only, and files for a
trusted third party go straight to its FileService, encrypted to the key the site pinned."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from researcher import DecryptionFailed, Registry, generate_identity
from scripts.federation import IMAGE_REGISTRY, LocalFederation
from tests.conftest import ROOT
from tests.images import engine_or_fail, pushed_test_image
from tests.registry_storage import stored_results
from tests.test_fileservice import FileServiceProcess

SITE = "hospital-a"
PATIENT_COUNT = f"{IMAGE_REGISTRY}/pht/patient-count:latest"
AGE_HEADER = b"age-encryption.org/v1\n"


@pytest.fixture(scope="module")
def fileservice(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ttp")
    service = FileServiceProcess(folder / "data", folder / "fileservice.log", max_file_bytes=1_000_000)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def federation(fileservice):
    engine_or_fail()
    ttp = {"url": fileservice.url, "public_key": fileservice.admin("public-key").stdout.strip(),
           "token": fileservice.admin("add-sender", SITE).stdout.strip()}
    with LocalFederation(site_names=(SITE,), patients_per_site=23, site_settings={"recipients": {"ttp": ttp}}) as fed:
        yield fed


@pytest.fixture(scope="module")
def identity(federation, tmp_path_factory):
    path = tmp_path_factory.mktemp("researcher") / "identity.txt"
    federation.researcher().register_public_key(generate_identity(path))
    return path


def stored_blobs(federation):
    return list(stored_results(federation.registry_data).values())


def test_encrypted_results_are_ciphertext_at_the_registry_and_open_for_the_researcher(federation, identity, tmp_path):
    researcher = Registry(federation.registry_url, federation.researcher_token, identity_file=identity)
    task = researcher.submit(PATIENT_COUNT, {"label": "secret"}, encrypt=True)
    [result] = researcher.wait_for_results(task["id"], timeout_seconds=120, progress=False)
    assert result.output == {"patient_count": 23, "label": "secret"}
    assert "23 patients" in result.log

    run = researcher.task(task["id"])["runs"][0]
    blobs = {sha: blob for sha, blob in stored_results(federation.registry_data).items()
             if sha in (run["output_sha256"], run["log_sha256"])}
    assert len(blobs) == 2
    for blob in blobs.values():
        assert blob.startswith(AGE_HEADER)  # on the registry's disk: ciphertext only
        assert b"patient_count" not in blob and b"23 patients" not in blob

    # Debian's age opens the same download: the researcher is not locked into our library.
    encrypted_output = tmp_path / "output.tar.gz.age"
    encrypted_output.write_bytes(blobs[run["output_sha256"]])
    opened = subprocess.run(["age", "--decrypt", "-i", str(identity), str(encrypted_output)],
                            capture_output=True, timeout=30, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(opened), mode="r:gz") as archive:
        assert json.load(archive.extractfile("output.txt"))["patient_count"] == 23


def test_a_wrong_or_missing_key_fails_clearly(federation, identity, tmp_path):
    owner = Registry(federation.registry_url, federation.researcher_token, identity_file=identity)
    task = owner.submit(PATIENT_COUNT, {}, encrypt=True)
    owner.wait(task["id"], timeout_seconds=120, progress=False)

    other_key = tmp_path / "other.txt"
    generate_identity(other_key)
    stranger = Registry(federation.registry_url, federation.researcher_token, identity_file=other_key)
    with pytest.raises(DecryptionFailed, match="does not decrypt with your identity"):
        stranger.results(task["id"])
    with pytest.raises(DecryptionFailed, match="give your identity file"):
        federation.researcher().results(task["id"])


def test_a_file_for_the_ttp_arrives_intact_and_decrypts_only_there(federation, fileservice, tmp_path):
    researcher = federation.researcher()
    linkage = "pseudonym,hash\n" + "".join(f"p{i},{i * 7919 % 104729}\n" for i in range(200))
    task = researcher.submit(pushed_test_image("ttp-sender"), {"files": {"ttp/linkage.csv": linkage}})
    [result] = researcher.wait_for_results(task["id"], timeout_seconds=120, progress=False)

    assert result.files == {"result.txt": b"done"}  # nothing under to/ reached the registry
    assert not any(linkage.encode() in blob for blob in stored_blobs(federation))
    [receipt] = researcher.task(task["id"])["runs"][0]["deliveries"]
    assert (receipt["recipient"], receipt["name"]) == ("ttp", "linkage.csv.age")

    received = fileservice.data_dir / "files" / SITE / str(task["id"]) / "linkage.csv.age"
    assert received.stat().st_size == receipt["size"]
    assert hashlib.sha256(received.read_bytes()).hexdigest() == receipt["sha256"]
    assert received.read_bytes().startswith(AGE_HEADER)
    exported = tmp_path / "linkage.csv"
    assert fileservice.admin("export", SITE, f"{task['id']}/linkage.csv.age", str(exported)).returncode == 0
    assert exported.read_text() == linkage


def test_a_file_for_an_undeclared_recipient_fails_the_run_and_goes_nowhere(federation, fileservice):
    before = sorted((fileservice.data_dir / "files").rglob("*"))
    researcher = federation.researcher()
    task = researcher.submit(pushed_test_image("ttp-sender"),
                             {"files": {"ttp/fine.csv": "a", "elsewhere/leak.csv": "patient data"}})
    run = researcher.wait(task["id"], timeout_seconds=120, progress=False)["runs"][0]

    assert run["status"] == "failed"
    assert "'elsewhere'" in run["reason"] and "nothing was sent" in run["reason"]
    assert run["deliveries"] == [] and run["output_sha256"] is None
    assert sorted((fileservice.data_dir / "files").rglob("*")) == before
    assert not any(b"patient data" in blob for blob in stored_blobs(federation))


def test_a_newline_in_a_recipient_folder_forges_no_log_line(federation):
    """An algorithm names its recipient folder "ttp\\n<a log line of its choosing>": the run fails, and neither
    the runner's log nor the registry's (which both record the reason) shows the forged line as a line."""
    forged = "2026-01-01 00:00:00,000 INFO pht.registry: run 1 completed"
    researcher = federation.researcher()
    task = researcher.submit(pushed_test_image("ttp-sender"), {"files": {f"ttp\n{forged}/x.csv": "a"}})
    run = researcher.wait(task["id"], timeout_seconds=120, progress=False)["runs"][0]

    assert run["status"] == "failed" and "nothing was sent" in run["reason"]
    for log in (federation.log_of(f"{SITE}-runner"), federation.log_of("registry")):
        assert not any(line.startswith(forged) for line in log.splitlines())
        assert f"\\x0a{forged}" in log or "?" + forged in log  # the line is there, its newline spelled out


def test_keygen_command_writes_a_private_key_and_registers_the_public_one(federation, tmp_path):
    identity = tmp_path / "keys" / "identity.txt"
    environment = {**os.environ, "PHT_REGISTRY_URL": federation.registry_url, "PHT_TOKEN": federation.researcher_token}
    done = subprocess.run([sys.executable, "-m", "researcher", "keygen", str(identity), "--register"],
                          capture_output=True, text=True, timeout=60, env=environment, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    public_key = done.stdout.strip()
    assert public_key.startswith("age1")
    assert identity.stat().st_mode & 0o077 == 0  # the private key is readable by its owner only
    assert public_key in [key["public_key"] for key in federation.researcher().public_keys()]
    again = subprocess.run([sys.executable, "-m", "researcher", "keygen", str(identity)],
                           capture_output=True, text=True, timeout=60, env=environment, cwd=ROOT)
    assert again.returncode == 1 and "exists already" in again.stderr
