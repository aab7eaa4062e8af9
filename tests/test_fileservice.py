"""The FileService as a trusted third party runs it: a real process, real age encryption."""

import hashlib
import http.client
import shutil
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest
import requests

from client.deliveries import DeliveryRefused, Recipient, deliver
from fileservice.inbox import ReceivedName, check_file_name, parse_received_name, task_id_problem
from scripts.federation import ROOT, free_port, wait_until_answers

FILESERVICE = str(ROOT / "fileservice" / "FileService.py")


class FileServiceProcess:
    def __init__(self, data_dir, log_path, max_file_bytes):
        self.data_dir = data_dir
        self.base = [sys.executable, FILESERVICE, "--data-dir", str(data_dir)]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.base, "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--max-file-bytes", str(max_file_bytes)],
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
def sender_token(fileservice):
    return fileservice.admin("add-sender", "hospital-a").stdout.strip()


@pytest.fixture
def sender(sender_token):
    return {"Authorization": f"Bearer {sender_token}"}


@pytest.fixture
def operator(fileservice):
    return {"Authorization": f"Bearer {fileservice.admin('add-operator', 'ttp-desk').stdout.strip()}"}


def send(fileservice, headers, task, name, body, sha256=None):
    """PUT /files/TASK/NAME, as a site runner sends a task's file."""
    return requests.put(f"{fileservice.url}/files/{task}/{name}", data=body, timeout=30, headers={
        **headers, "X-Content-SHA256": sha256 or hashlib.sha256(body).hexdigest()})


def send_without_task(fileservice, headers, name, body):
    """PUT /files/NAME, as a site runner from before names were kept per task sends a file."""
    return requests.put(f"{fileservice.url}/files/{name}", data=body, timeout=30, headers={
        **headers, "X-Content-SHA256": hashlib.sha256(body).hexdigest()})


def raw_request(fileservice, method, path, headers, body=b""):
    """The path exactly as written: requests (urllib3) would resolve its ".." before sending, as an attacker would
    not. Returns (status, body)."""
    connection = http.client.HTTPConnection(fileservice.url.removeprefix("http://"), timeout=30)
    try:
        connection.request(method, path, body=body, headers={
            **headers, "X-Content-SHA256": hashlib.sha256(body).hexdigest()})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def sealed(fileservice, plaintext):
    """plaintext as a site sends it: encrypted to the service's public key."""
    public_key = fileservice.admin("public-key").stdout.strip()
    return pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(public_key)])


def stored_files(fileservice):
    return sorted(p.relative_to(fileservice.data_dir) for p in (fileservice.data_dir / "files").rglob("*")
                  if p.is_file())


def leftovers(fileservice):
    return list((fileservice.data_dir / "incoming").iterdir())


def snapshot(folder):
    """Every path under folder with its content (None for a folder), but the service's own log, which grows."""
    return {path.relative_to(folder): None if path.is_dir() else path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.name != "fileservice.log"}


def listed(fileservice, operator):
    return requests.get(fileservice.url + "/files", headers=operator, timeout=10).json()


@pytest.mark.skipif(shutil.which("age") is None,
                    reason="Debian's age tool is not installed (scripts/setup.sh installs it)")
def test_a_file_arrives_intact_and_decrypts_for_the_ttp(fileservice, sender, operator, tmp_path):
    public_key = requests.get(fileservice.url + "/public-key", timeout=10).json()["public_key"]
    assert public_key == fileservice.admin("public-key").stdout.strip()
    plaintext = b"patient-level linkage keys\n" * 100
    ciphertext = pyrage.encrypt(plaintext, [pyrage.x25519.Recipient.from_str(public_key)])

    response = send(fileservice, sender, 1, "linkage.csv.age", ciphertext)
    assert response.status_code == 200
    assert response.json() == {"sender": "hospital-a", "name": "1/linkage.csv.age", "size": len(ciphertext),
                               "already_received": False}

    assert listed(fileservice, operator) == [{"sender": "hospital-a", "name": "1/linkage.csv.age",
                                              "size": len(ciphertext)}]
    downloaded = requests.get(f"{fileservice.url}/files/hospital-a/1/linkage.csv.age", headers=operator, timeout=10)
    assert downloaded.content == ciphertext

    exported = tmp_path / "linkage.csv"
    assert fileservice.admin("export", "hospital-a", "1/linkage.csv.age", str(exported)).returncode == 0
    assert exported.read_bytes() == plaintext
    # The standard age tool reads the same file with the service's identity: no lock-in.
    with_age = subprocess.run(["age", "--decrypt", "-i", str(fileservice.data_dir / "identity.txt")],
                              input=ciphertext, capture_output=True, timeout=30)
    assert with_age.returncode == 0 and with_age.stdout == plaintext


def test_identity_file_is_private(fileservice):
    assert (fileservice.data_dir / "identity.txt").stat().st_mode & 0o077 == 0


# --- what an attacker sends ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """One FileService for the attacks below, each of which must leave it as it found it (compared whole): one
    process for them all, rather than one each. It holds a file, which the attacks try to reach."""
    folder = tmp_path_factory.mktemp("attacked")
    service = FileServiceProcess(folder / "ttp", folder / "fileservice.log", max_file_bytes=100_000)
    service.root = folder
    service.sender = {"Authorization": f"Bearer {service.admin('add-sender', 'hospital-a').stdout.strip()}"}
    service.operator = {"Authorization": f"Bearer {service.admin('add-operator', 'ttp-desk').stdout.strip()}"}
    assert send(service, service.sender, 1, "result.csv.age", sealed(service, b"kept")).status_code == 200
    yield service
    service.stop()


HOSTILE_TASK_IDS = ["-1", "0", "07", "+1", "1.0", "1e3", "1_000", "\u0663", "1\u0663", " 1", "1 ", "x", "9" * 19]


@pytest.mark.parametrize("task", HOSTILE_TASK_IDS)
def test_a_task_id_that_is_not_a_positive_number_is_refused_and_leaves_nothing(target, task):
    before = snapshot(target.root)
    response = send(target, target.sender, task, "result.csv.age", b"data")
    assert response.status_code == 400 and "is not a task id" in response.json()["message"]
    assert snapshot(target.root) == before and leftovers(target) == []


@pytest.mark.parametrize("path", [
    "/files/../x/result.csv.age", "/files/1/../../x", "/files/1/../../../escape",
    "/files/..%2Fx/result.csv.age", "/files/1%2F..%2F..%2F/escape", "/files/%2e%2e/escape",
    "/files/1/%2e%2e", "/files/1/..%2F..%2Fidentity.txt", "/files/1/../../identity.txt", "/files/..",
    "/files/1/..%2Fescape", "/files/1/sub/dir",
])
def test_a_task_id_or_name_that_leads_elsewhere_reaches_no_other_file(target, path):
    before = snapshot(target.root)
    status, _ = raw_request(target, "PUT", path, target.sender, b"data")
    assert status in (400, 404, 405)
    assert snapshot(target.root) == before


@pytest.mark.parametrize("path", [
    "/files/%2e%2e/identity.txt", "/files/..%2F..%2Fttp/identity.txt", "/files/hospital-a/..%2F..%2Fidentity.txt",
    "/files/hospital-a/1/..%2F..%2F..%2Ftokens.json", "/files/hospital-a/1/../../../identity.txt",
    "/files/hospital-a/1/%2e%2e%2f%2e%2e%2f%2e%2e%2fidentity.txt",
])
def test_a_download_path_that_leads_elsewhere_gives_nothing(target, path):
    status, body = raw_request(target, "GET", path, target.operator)
    assert status in (404, 405) and b"AGE-SECRET-KEY" not in body and b"operator" not in body


@pytest.mark.parametrize("sender_name, name", [
    ("..", "identity.txt"), ("hospital-a", "../../identity.txt"), ("hospital-a", "1/../../../tokens.json"),
    ("hospital-a", "/etc/passwd"), ("hospital-a/1", "result.csv.age"), ("hospital-a", "1//result.csv.age"),
    ("hospital-a", "01/result.csv.age"), ("hospital-a", "1"),
])
def test_export_and_delete_take_no_path_out_of_the_inbox(target, tmp_path, sender_name, name):
    before = snapshot(target.root)
    for command in (["delete", sender_name, name], ["export", sender_name, name, str(tmp_path / "out")]):
        done = target.admin(*command)
        assert done.returncode == 1 and "list-files" in done.stderr, done
    assert snapshot(target.root) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["..", ".hidden", "..secret", "a..b", "with space", "x" * 201, "semi;colon",
                                  "%2e%2e"])
def test_path_tricks_in_names_are_refused_and_leave_nothing(target, name):
    before = snapshot(target.root)
    response = send(target, target.sender, 1, name, b"data")
    assert response.status_code in (400, 404)
    assert snapshot(target.root) == before and leftovers(target) == []


# --- names kept apart per task ---------------------------------------------------------------------------

def test_two_tasks_that_write_one_name_both_land(fileservice, sender, operator):
    first, second = b"task one's result", b"task two's result"
    assert send(fileservice, sender, 2, "result.csv.age", second).status_code == 200
    answer = send(fileservice, sender, 1, "result.csv.age", first)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"sender": "hospital-a", "name": "1/result.csv.age", "size": len(first),
                             "already_received": False}

    assert listed(fileservice, operator) == [
        {"sender": "hospital-a", "name": "1/result.csv.age", "size": len(first)},
        {"sender": "hospital-a", "name": "2/result.csv.age", "size": len(second)}]
    for entry, body in zip(listed(fileservice, operator), (first, second)):
        downloaded = requests.get(f"{fileservice.url}/files/hospital-a/{entry['name']}", headers=operator, timeout=10)
        assert downloaded.content == body


def test_a_retried_upload_is_received_once_and_other_content_under_its_name_is_a_conflict(fileservice, sender):
    assert send(fileservice, sender, 1, "result.csv.age", b"first").json()["already_received"] is False
    again = send(fileservice, sender, 1, "result.csv.age", b"first")
    assert again.status_code == 200 and again.json()["already_received"] is True

    other = send(fileservice, sender, 1, "result.csv.age", b"second")
    assert other.status_code == 409 and "1/result.csv.age exists already" in other.json()["message"]
    assert stored_files(fileservice) == [Path("files/hospital-a/1/result.csv.age")]
    assert (fileservice.data_dir / "files" / "hospital-a" / "1" / "result.csv.age").read_bytes() == b"first"
    assert leftovers(fileservice) == []


def test_a_site_delivers_two_tasks_files_of_one_name_and_a_retried_delivery_lands_once(fileservice, sender_token,
                                                                                       operator, tmp_path):
    recipients = {"ttp": Recipient("ttp", fileservice.url, fileservice.admin("public-key").stdout.strip(),
                                   sender_token)}
    receipts = []

    def outbox_with(run, plaintext):
        outbox = tmp_path / f"run-{run}" / "outbox"
        (outbox / "ttp").mkdir(parents=True)
        (outbox / "ttp" / "result.csv.age").write_bytes(sealed(fileservice, plaintext))
        return outbox

    def send_outbox(outbox, task_id):
        deliver(outbox, recipients, task_id=task_id, retry_for_seconds=5,
                record_receipt=lambda *receipt: receipts.append(receipt[:2]))

    first, second = outbox_with(1, b"task 1"), outbox_with(2, b"task 2")
    send_outbox(first, 11)
    send_outbox(second, 12)
    send_outbox(first, 11)  # the runner restarted before it had reported the run: the same file again

    assert [entry["name"] for entry in listed(fileservice, operator)] == ["11/result.csv.age", "12/result.csv.age"]
    assert receipts == [("ttp", "result.csv.age")] * 3
    with pytest.raises(DeliveryRefused, match="409 .*11/result.csv.age exists already with other content"):
        send_outbox(outbox_with(3, b"task 1, run again"), 11)


def test_list_files_shows_the_names_that_export_and_delete_take(fileservice, sender, tmp_path):
    plaintext = b"pseudonym,hash\np1,7919\n"
    assert send(fileservice, sender, 7, "linkage.csv.age", sealed(fileservice, plaintext)).status_code == 200

    [line] = fileservice.admin("list-files").stdout.splitlines()
    sender_name, name, size = line.split("\t")
    assert (sender_name, name) == ("hospital-a", "7/linkage.csv.age")
    exported = tmp_path / "linkage.csv"
    done = fileservice.admin("export", sender_name, name, str(exported))
    assert done.returncode == 0 and exported.read_bytes() == plaintext, done.stderr

    deleted = fileservice.admin("delete", sender_name, name)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == f"deleted hospital-a/7/linkage.csv.age ({size} bytes)\n"
    assert fileservice.admin("list-files").stdout == "" and stored_files(fileservice) == []


def test_a_name_that_is_not_there_gets_one_line_that_names_list_files(fileservice, sender, tmp_path):
    assert send(fileservice, sender, 7, "linkage.csv.age", sealed(fileservice, b"kept")).status_code == 200
    for command in (["export", "hospital-a", "linkage.csv", str(tmp_path / "out")],
                    ["export", "hospital-a", "7/linkage.csv", str(tmp_path / "out")],
                    ["delete", "hospital-a", "linkage.csv.age"], ["delete", "hospital-b", "7/linkage.csv.age"]):
        done = fileservice.admin(*command)
        assert done.returncode == 1
        [line] = done.stderr.splitlines()
        assert line.startswith("Error: no file ") and "list-files" in line, line
    assert stored_files(fileservice) == [Path("files/hospital-a/7/linkage.csv.age")]
    assert not (tmp_path / "out").exists()


# --- files from before names were kept per task ----------------------------------------------------------

def test_files_received_before_names_were_kept_per_task_are_listed_exported_and_deleted(tmp_path):
    data_dir = tmp_path / "ttp"
    older = FileServiceProcess(data_dir, tmp_path / "fileservice.log", max_file_bytes=100_000)
    older.stop()
    # Where a FileService that kept no tasks apart stored a file: straight in its sender's folder.
    plaintext = b"linkage from an older runner\n"
    (data_dir / "files" / "hospital-a").mkdir(parents=True)
    (data_dir / "files" / "hospital-a" / "linkage.csv.age").write_bytes(sealed(older, plaintext))

    service = FileServiceProcess(data_dir, tmp_path / "fileservice.log", max_file_bytes=100_000)
    try:
        sender = {"Authorization": f"Bearer {service.admin('add-sender', 'hospital-a').stdout.strip()}"}
        operator = {"Authorization": f"Bearer {service.admin('add-operator', 'ttp-desk').stdout.strip()}"}
        assert send(service, sender, 3, "linkage.csv.age", sealed(service, b"task 3")).status_code == 200

        assert [entry["name"] for entry in listed(service, operator)] == ["linkage.csv.age", "3/linkage.csv.age"]
        assert service.admin("list-files").stdout.splitlines()[0].split("\t")[:2] == ["hospital-a", "linkage.csv.age"]
        downloaded = requests.get(f"{service.url}/files/hospital-a/linkage.csv.age", headers=operator, timeout=10)
        assert downloaded.status_code == 200
        assert service.admin("export", "hospital-a", "linkage.csv.age", str(tmp_path / "old.csv")).returncode == 0
        assert (tmp_path / "old.csv").read_bytes() == plaintext

        assert service.admin("delete", "hospital-a", "linkage.csv.age").returncode == 0
        assert stored_files(service) == [Path("files/hospital-a/3/linkage.csv.age")]
    finally:
        service.stop()


def test_a_site_runner_that_names_no_task_still_delivers_as_before(fileservice, sender):
    answer = send_without_task(fileservice, sender, "linkage.csv.age", b"first")
    assert answer.status_code == 200
    assert answer.json() == {"sender": "hospital-a", "name": "linkage.csv.age", "size": 5, "already_received": False}
    assert send_without_task(fileservice, sender, "linkage.csv.age", b"first").json()["already_received"] is True
    assert send_without_task(fileservice, sender, "linkage.csv.age", b"other").status_code == 409
    assert stored_files(fileservice) == [Path("files/hospital-a/linkage.csv.age")]


def test_a_file_without_a_task_and_a_tasks_folder_of_one_name_are_a_conflict_that_keeps_both(fileservice, sender):
    assert send_without_task(fileservice, sender, "7", b"older").status_code == 200
    refused = send(fileservice, sender, 7, "result.csv.age", b"newer")
    assert refused.status_code == 409 and "delete" in refused.json()["message"], refused.text
    assert send(fileservice, sender, 8, "result.csv.age", b"newer").status_code == 200
    assert send_without_task(fileservice, sender, "8", b"older").status_code == 409
    assert stored_files(fileservice) == [Path("files/hospital-a/7"), Path("files/hospital-a/8/result.csv.age")]
    assert (fileservice.data_dir / "files" / "hospital-a" / "7").read_bytes() == b"older"
    assert leftovers(fileservice) == []


# --- the rules, pure ---------------------------------------------------------------------------------------

def test_file_name_rule_is_pure_and_explains_itself():
    assert check_file_name("result-1.tar.gz.age") is None
    assert "acceptable file name" in check_file_name("../etc/passwd")


def test_task_ids_and_listed_names_follow_pure_rules():
    assert task_id_problem("7") is None and task_id_problem("9" * 18) is None
    for hostile in [*HOSTILE_TASK_IDS, "", "1/", "../x", None]:
        assert "is not a task id" in task_id_problem(hostile), hostile
    assert parse_received_name("7/result.csv.age") == ReceivedName(7, "result.csv.age")
    assert parse_received_name("result.csv.age") == ReceivedName(None, "result.csv.age")
    assert str(ReceivedName(7, "result.csv.age")) == "7/result.csv.age"
    assert str(ReceivedName(None, "result.csv.age")) == "result.csv.age"
    for hostile in ["", "/", "7/", "/x", "07/x", "-1/x", "0/x", "7/../x", "../x", "7/x/y", "7//x", "x/7", "..",
                    7, None]:
        assert parse_received_name(hostile) is None, hostile


# --- limits and callers ------------------------------------------------------------------------------------

def test_oversized_files_are_refused_and_leave_nothing(fileservice, sender):
    body = b"x" * 100_001
    assert send(fileservice, sender, 1, "big.bin", body).status_code == 413
    chunked = send(fileservice, sender, 1, "big.bin", iter([body]), sha256=hashlib.sha256(body).hexdigest())
    assert chunked.status_code == 413  # sent chunked: no length announced, the limit holds while streaming
    assert stored_files(fileservice) == [] and leftovers(fileservice) == []


def test_wrong_checksum_is_refused_and_leaves_nothing(fileservice, sender):
    response = send(fileservice, sender, 1, "file.age", b"data", sha256="0" * 64)
    assert response.status_code == 400 and "sha256" in response.json()["message"]
    assert stored_files(fileservice) == [] and leftovers(fileservice) == []


def test_unknown_senders_and_wrong_roles_are_refused(fileservice, sender, operator):
    assert send(fileservice, {}, 1, "file.age", b"data").status_code == 401
    assert send(fileservice, {"Authorization": "Bearer pht_fs_forged"}, 1, "file.age", b"data").status_code == 401
    assert send(fileservice, operator, 1, "file.age", b"data").status_code == 403
    assert requests.get(fileservice.url + "/files", headers=sender, timeout=10).status_code == 403
    assert stored_files(fileservice) == []
    assert fileservice.admin("revoke", "hospital-a").returncode == 0
    assert send(fileservice, sender, 1, "file.age", b"data").status_code == 401
