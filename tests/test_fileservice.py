"""The FileService as a trusted third party runs it: a real process, real age encryption."""

import hashlib
import shutil
import subprocess
import sys

import pyrage
import pytest
import requests

from fileservice.inbox import check_file_name
from scripts.federation import free_port, wait_until_answers
from tests.conftest import ROOT

FILESERVICE = str(ROOT / "fileservice" / "FileService.py")


class FileServiceProcess:
    def __init__(self, data_dir, log_path, max_file_bytes):
        self.data_dir = data_dir
        self.base = [sys.executable, FILESERVICE, "--data-dir", str(data_dir)]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*self.base, "serve", "--host", "127.0.0.1", "--port", str(port), "--max-file-bytes", str(max_file_bytes)],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until_answers(self.url + "/health", self.process, "the FileService")

    def admin(self, *command):
        return subprocess.run([*self.base, *command], capture_output=True, text=True, timeout=60)

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def fileservice(tmp_path):
    service = FileServiceProcess(tmp_path / "ttp", tmp_path / "fileservice.log", max_file_bytes=100_000)
    yield service
    service.stop()


@pytest.fixture
def sender(fileservice):
    return {"Authorization": f"Bearer {fileservice.admin('add-sender', 'hospital-a').stdout.strip()}"}


@pytest.fixture
def operator(fileservice):
    return {"Authorization": f"Bearer {fileservice.admin('add-operator', 'ttp-desk').stdout.strip()}"}


def send(fileservice, headers, name, body, sha256=None):
    return requests.put(f"{fileservice.url}/files/{name}", data=body, timeout=30, headers={
        **headers, "X-Content-SHA256": sha256 or hashlib.sha256(body).hexdigest()})


def stored_files(fileservice):
    return sorted(p.relative_to(fileservice.data_dir) for p in (fileservice.data_dir / "files").rglob("*") if p.is_file())


def leftovers(fileservice):
    return list((fileservice.data_dir / "incoming").iterdir())


@pytest.mark.skipif(shutil.which("age") is None, reason="Debian's age tool is not installed (scripts/setup.sh installs it)")
def test_a_file_arrives_intact_and_decrypts_for_the_ttp(fileservice, sender, operator, tmp_path):
    public_key = requests.get(fileservice.url + "/public-key", timeout=10).json()["public_key"]
    assert public_key == fileservice.admin("public-key").stdout.strip()
    plaintext = b"patient-level linkage keys\n" * 100
    ciphertext = pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(public_key)])

    response = send(fileservice, sender, "linkage.csv.age", ciphertext)
    assert response.status_code == 200
    assert response.json() == {"sender": "hospital-a", "name": "linkage.csv.age", "size": len(ciphertext),
                               "already_received": False}
    assert send(fileservice, sender, "linkage.csv.age", ciphertext).json()["already_received"] is True

    listed = requests.get(fileservice.url + "/files", headers=operator, timeout=10).json()
    assert listed == [{"sender": "hospital-a", "name": "linkage.csv.age", "size": len(ciphertext)}]
    downloaded = requests.get(f"{fileservice.url}/files/hospital-a/linkage.csv.age", headers=operator, timeout=10)
    assert downloaded.content == ciphertext

    exported = tmp_path / "linkage.csv"
    assert fileservice.admin("export", "hospital-a", "linkage.csv.age", str(exported)).returncode == 0
    assert exported.read_bytes() == plaintext
    # The standard age tool reads the same file with the service's identity: no lock-in.
    with_age = subprocess.run(["age", "--decrypt", "-i", str(fileservice.data_dir / "identity.txt")],
                              input=ciphertext, capture_output=True, timeout=30)
    assert with_age.returncode == 0 and with_age.stdout == plaintext


def test_identity_file_is_private(fileservice):
    assert (fileservice.data_dir / "identity.txt").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("name", ["..", ".hidden", "..secret", "a..b", "with space", "x" * 201, "semi;colon", "%2e%2e"])
def test_path_tricks_in_names_are_refused_and_leave_nothing(fileservice, sender, name):
    response = send(fileservice, sender, name, b"data")
    assert response.status_code in (400, 404)
    assert stored_files(fileservice) == [] and leftovers(fileservice) == []


def test_names_with_slashes_never_reach_another_folder(fileservice, sender):
    for name in ("../escape", "..%2Fescape", "sub/dir"):
        # 405: the decoded slash makes it the operator's two-part download path, which takes no PUT.
        assert send(fileservice, sender, name, b"data").status_code in (400, 404, 405)
    assert stored_files(fileservice) == []
    assert not (fileservice.data_dir / "escape").exists()


def test_file_name_rule_is_pure_and_explains_itself():
    assert check_file_name("result-1.tar.gz.age") is None
    assert "acceptable file name" in check_file_name("../etc/passwd")


def test_oversized_files_are_refused_and_leave_nothing(fileservice, sender):
    body = b"x" * 100_001
    assert send(fileservice, sender, "big.bin", body).status_code == 413
    chunked = send(fileservice, sender, "big.bin", iter([body]), sha256=hashlib.sha256(body).hexdigest())
    assert chunked.status_code == 413  # sent chunked: no length announced, the limit holds while streaming
    assert stored_files(fileservice) == [] and leftovers(fileservice) == []


def test_wrong_checksum_is_refused_and_leaves_nothing(fileservice, sender):
    response = send(fileservice, sender, "file.age", b"data", sha256="0" * 64)
    assert response.status_code == 400 and "sha256" in response.json()["message"]
    assert stored_files(fileservice) == [] and leftovers(fileservice) == []


def test_other_content_under_a_received_name_is_a_conflict(fileservice, sender):
    assert send(fileservice, sender, "file.age", b"first").status_code == 200
    assert send(fileservice, sender, "file.age", b"second").status_code == 409
    assert (fileservice.data_dir / "files" / "hospital-a" / "file.age").read_bytes() == b"first"


def test_unknown_senders_and_wrong_roles_are_refused(fileservice, sender, operator):
    assert send(fileservice, {}, "file.age", b"data").status_code == 401
    assert send(fileservice, {"Authorization": "Bearer pht_fs_forged"}, "file.age", b"data").status_code == 401
    assert send(fileservice, operator, "file.age", b"data").status_code == 403
    assert requests.get(fileservice.url + "/files", headers=sender, timeout=10).status_code == 403
    assert stored_files(fileservice) == []
    assert fileservice.admin("revoke", "hospital-a").returncode == 0
    assert send(fileservice, sender, "file.age", b"data").status_code == 401
