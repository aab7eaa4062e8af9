"""The registry's result store (master/blobs.py), on both back ends: the folder in its data folder and an
S3 bucket, here of a real SeaweedFS on loopback (scripts/seaweedfs.sh; scripts/test.sh starts it).

Each test sends results through the registry's API as a site and a researcher do; the store is looked at
directly only to damage it, as a failing disk or an operator's mistake would.
"""

import hashlib
import logging
import os
import subprocess
import sys
import uuid

import boto3
import pytest
from botocore.config import Config

from master import app as app_module
from master import blobs
from master.app import Settings, create_app
from tests.conftest import ROOT, _bearer_for
from tests.tcp_switch import Switch
from tests.test_registry_api import claim, finish, post_task, upload

S3_CREDENTIALS = ROOT / ".local" / "seaweedfs" / "credentials"
MIB = 1024 ** 2


@pytest.fixture(scope="session")
def s3_endpoint():
    url = os.environ.get("PHT_TEST_S3_URL")
    if not url or not S3_CREDENTIALS.exists():
        pytest.skip("PHT_TEST_S3_URL is not set: no S3 store (scripts/test.sh starts SeaweedFS)")
    return url


@pytest.fixture
def s3_credentials(s3_endpoint, monkeypatch):
    """The store's account in the environment, where boto3 (in this process and in registries it starts)
    looks for it."""
    for line in S3_CREDENTIALS.read_text().split():
        name, _, value = line.partition("=")
        monkeypatch.setenv(name, value)
    return {name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}


@pytest.fixture
def s3(s3_endpoint, s3_credentials):
    return boto3.client("s3", endpoint_url=s3_endpoint, config=Config(s3={"addressing_style": "path"}))


@pytest.fixture
def bucket(s3):
    """A new, empty bucket, removed with what is in it afterwards."""
    name = f"pht-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for listed in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=listed["Key"])
    s3.delete_bucket(Bucket=name)


class StoreUnderTest:
    """A registry's settings for one back end, and a way to reach into what it stores."""

    def __init__(self, kind, request):
        self.kind = kind
        if kind == "s3":
            self.endpoint, self.bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("bucket")
            self._s3 = request.getfixturevalue("s3")

    def settings(self, data_dir, database_url=""):
        if self.kind == "folder":
            return Settings(data_dir=data_dir, database_url=database_url)
        return Settings(data_dir=data_dir, database_url=database_url, result_store=f"s3://{self.bucket}/results",
                        s3_endpoint_url=self.endpoint)

    def stored(self, app):
        """{sha256: bytes} of every blob the store holds."""
        if self.kind == "folder":
            root = app.extensions["pht"].blobs.root
            return {path.name: path.read_bytes() for path in root.glob("??/*")}
        listed = self._s3.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {item["Key"].removeprefix("results/"): self._s3.get_object(Bucket=self.bucket, Key=item["Key"])
                ["Body"].read() for item in listed}

    def replace(self, app, sha256, content):
        """Make the stored blob content instead (None: remove it)."""
        if self.kind == "folder":
            path = app.extensions["pht"].blobs.path_of(sha256)
            path.unlink() if content is None else path.write_bytes(content)
        elif content is None:
            self._s3.delete_object(Bucket=self.bucket, Key=f"results/{sha256}")
        else:
            self._s3.put_object(Bucket=self.bucket, Key=f"results/{sha256}", Body=content)


@pytest.fixture(params=["folder", "s3"])
def result_store(request):
    return StoreUnderTest(request.param, request)


@pytest.fixture
def registry(tmp_path, result_store):
    app = create_app(result_store.settings(tmp_path / "registry"))
    yield app
    app.extensions["pht"].engine.dispose()


def a_run_of(app):
    """(the test client, a researcher's and a site's headers, a claimed run)"""
    client = app.test_client()
    alice, hospital = _bearer_for(app, "researcher", "alice"), _bearer_for(app, "site", "hospital-a")
    post_task(client, alice)
    return client, alice, hospital, claim(client, hospital).json


def test_a_result_is_stored_and_sent_back_whole_with_its_checksum(registry, result_store):
    client, alice, hospital, run = a_run_of(registry)
    content = os.urandom(3 * MIB + 17)  # more than one chunk each way
    assert upload(client, hospital, run, "output", content).status_code == 200

    answer = client.get(f"/api/runs/{run['id']}/output", headers=alice)
    assert answer.status_code == 200 and answer.data == content
    assert answer.headers["X-Content-SHA256"] == hashlib.sha256(content).hexdigest()
    assert answer.headers["Content-Length"] == str(len(content))
    assert answer.headers["Content-Disposition"] == f"attachment; filename=run-{run['id']}-output.tar.gz"
    assert result_store.stored(registry) == {hashlib.sha256(content).hexdigest(): content}


def test_a_wrong_upload_neither_lands_nor_replaces_the_right_one(registry, result_store):
    """Attack: a site declares the sha256 of another run's result and sends other bytes."""
    client, alice, hospital, run = a_run_of(registry)
    right = b"the first site's result"
    upload(client, hospital, run, "output", right)
    post_task(client, alice)
    other = claim(client, hospital).json

    answer = upload(client, hospital, other, "output", b"forged", sha256=hashlib.sha256(right).hexdigest())

    assert answer.status_code == 400 and "sha256" in answer.json["message"]
    assert result_store.stored(registry) == {hashlib.sha256(right).hexdigest(): right}
    assert client.get(f"/api/runs/{run['id']}/output", headers=alice).data == right
    assert list((registry.extensions["pht"].settings.data_dir).glob("**/incoming/*")) == []  # nothing left behind


def test_a_result_over_the_limit_is_refused_and_not_stored(tmp_path, result_store):
    app = create_app(Settings(**{**result_store.settings(tmp_path / "registry").__dict__, "max_result_bytes": 1000}))
    client, _, hospital, run = a_run_of(app)
    assert upload(client, hospital, run, "output", bytes(1001)).status_code == 413
    assert result_store.stored(app) == {}
    app.extensions["pht"].engine.dispose()


@pytest.mark.parametrize("damage", [None, b"cut sh"], ids=["removed", "truncated"])
def test_a_missing_or_damaged_blob_answers_json_and_is_logged_once(registry, result_store, damage, caplog):
    client, alice, hospital, run = a_run_of(registry)
    content = b"the site's result"
    upload(client, hospital, run, "output", content)
    result_store.replace(registry, hashlib.sha256(content).hexdigest(), damage)

    with caplog.at_level(logging.INFO, logger="pht.registry"):
        answer = client.get(f"/api/runs/{run['id']}/output", headers=alice)

    assert answer.status_code == 500 and answer.is_json
    assert answer.json["message"] == (f"the output of run {run['id']} is missing from the registry's result store; "
                                      "the registry's operator finds why in its log")
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, caplog.text
    assert f"the output of run {run['id']} cannot be sent" in errors[0].getMessage()


def test_a_store_that_stops_answering_degrades_the_registry_and_its_results_answer_503(
        tmp_path, s3_endpoint, bucket, caplog, monkeypatch):
    monkeypatch.setattr(app_module, "STORE_CHECK_SECONDS", 0)  # each probe asks the store
    relay = Switch(int(s3_endpoint.rsplit(":", 1)[1]))
    app = create_app(Settings(data_dir=tmp_path / "registry", result_store=f"s3://{bucket}",
                              s3_endpoint_url=relay.url))
    client, alice, hospital, run = a_run_of(app)
    upload(client, hospital, run, "output", b"stored before")
    assert client.get("/health").json == {"status": "ok"}

    relay.turn_off()

    with caplog.at_level(logging.INFO, logger="pht.registry"):
        health = [client.get("/health") for _ in range(3)]
    # Still in a balancer's rotation: a store every replica shares must not take them all out at once.
    assert [answer.status_code for answer in health] == [200] * 3
    assert health[0].json == {"status": "degraded", "problems": ["the result store does not answer"]}
    unhealthy = [record.getMessage() for record in caplog.records if "unhealthy" in record.getMessage()]
    assert len(unhealthy) == 1 and f"the bucket {bucket} at {relay.url} failed" in unhealthy[0]  # once, not per probe
    download = client.get(f"/api/runs/{run['id']}/output", headers=alice)
    assert download.status_code == 503 and download.json["message"] == (
        "the registry's result store does not answer; try again later")
    post_task(client, alice)
    claimed = claim(client, hospital).json  # what does not touch the store goes on
    answer = upload(client, hospital, claimed, "output", b"stored after")
    assert answer.status_code == 503 and "upload again later" in answer.json["message"]
    app.extensions["pht"].engine.dispose()


def test_a_run_that_has_its_result_stores_no_other(registry, result_store):
    """Attack: a site uploads other results for a run that has one (or has ended). Each was stored before it was
    refused with 409: blobs nothing refers to, as many as the site liked. Now the answer comes before the body."""
    client, alice, hospital, run = a_run_of(registry)
    upload(client, hospital, run, "output", b"the result")
    finish(client, hospital, run)
    for other in (b"another result", b"and another"):
        assert upload(client, hospital, run, "output", other).status_code == 409
    assert upload(client, hospital, run, "log", b"a late log").status_code == 409
    assert upload(client, hospital, run, "output", b"the result").status_code == 200  # the same again is fine
    assert set(result_store.stored(registry)) == {hashlib.sha256(b"the result").hexdigest()}


def test_an_object_of_the_same_name_not_stored_by_the_registry_is_replaced(registry, result_store):
    """The bucket held bytes of the right size under a result's name (damaged, or put there by someone else):
    the next upload of that result stores it again, instead of counting it stored."""
    if result_store.kind != "s3":
        pytest.skip("a folder's file is replaced by each upload anyway")
    client, alice, hospital, run = a_run_of(registry)
    content = b"the site's result"
    result_store.replace(registry, hashlib.sha256(content).hexdigest(), b"x" * len(content))
    assert upload(client, hospital, run, "output", content).status_code == 200
    assert client.get(f"/api/runs/{run['id']}/output", headers=alice).data == content


def test_uploads_cut_short_by_a_crash_are_removed_at_start(tmp_path, result_store):
    settings = result_store.settings(tmp_path / "registry")
    create_app(settings).extensions["pht"].engine.dispose()
    incoming = next(path for path in (tmp_path / "registry").rglob("incoming") if path.is_dir())
    (incoming / "tmpcut").write_bytes(b"half an upload")
    create_app(settings).extensions["pht"].engine.dispose()
    assert list(incoming.iterdir()) == []


def test_two_replicas_with_their_own_data_folders_share_results(tmp_path, database_url, request):
    """As on two machines: one database, one bucket, two data folders. Uploaded through one replica, a
    result downloads through the other (with a folder store it did not: a 500)."""
    store = StoreUnderTest("s3", request)
    first = create_app(store.settings(tmp_path / "first", database_url))
    second = create_app(store.settings(tmp_path / "second", database_url))
    try:
        client, alice, hospital, run = a_run_of(first)
        content = os.urandom(MIB)
        assert upload(client, hospital, run, "output", content).status_code == 200
        answer = second.test_client().get(f"/api/runs/{run['id']}/output", headers=alice)
        assert answer.status_code == 200 and answer.data == content
    finally:
        first.extensions["pht"].engine.dispose()
        second.extensions["pht"].engine.dispose()


@pytest.mark.parametrize("store_options, complaint", [
    (["--result-store", "s3://pht-no-such-bucket"], "the bucket pht-no-such-bucket at "),
    (["--result-store", "ftp://somewhere/results"], "is not s3://BUCKET or s3://BUCKET/PREFIX"),
    (["--result-store", "s3://[bucket"], "is not s3://BUCKET or s3://BUCKET/PREFIX"),
    (["--result-store", "s3://pht-results/../other"], "is not s3://BUCKET or s3://BUCKET/PREFIX"),
    (["--result-store", "s3://pht-results", "--s3-endpoint-url", "localhost:8333"], "is not a URL"),
])
def test_serve_names_a_result_store_it_cannot_use_and_stops(tmp_path, s3_endpoint, s3_credentials, store_options,
                                                            complaint):
    done = subprocess.run([sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(tmp_path / "r"),
                           "serve", "--host", "127.0.0.1", "--port", "1", "--s3-endpoint-url", s3_endpoint,
                           *store_options], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and complaint in last and "Traceback" not in done.stderr


def test_a_location_with_credentials_is_refused_without_repeating_them(tmp_path):
    with pytest.raises(blobs.StoreUnreachable, match="leave it out for the folder in --data-dir") as refused:
        blobs.open_store("s3://KEY:SECRET@pht-results", tmp_path)
    assert "SECRET" not in str(refused.value)
