"""The registry as several replicas behind HAProxy (scripts/balancer.py), as on several machines: each its
own process and data folder, one PostgreSQL database, one S3 bucket (SeaweedFS). A researcher and a site
talk to the balancer only.
"""

import concurrent.futures
import hashlib
import os
import signal
import socket
import time

import pytest
import requests

from client.registry_client import RegistryClient
from master import store
from scripts.balancer import Balancer
from scripts.federation import free_port, register_directly, wait_until_answers
from tests.test_registry_server import IMAGE, RegistryProcess, bearer
from tests.test_result_store import bucket, s3, s3_credentials, s3_endpoint  # noqa: F401 (fixtures)


@pytest.fixture
def replicated(tmp_path, postgres_url, s3_endpoint, s3_credentials, bucket):  # noqa: F811 (fixtures)
    """(balancer URL, [replica processes], tokens of a site and a researcher)"""
    store_options = ("--result-store", f"s3://{bucket}/results", "--s3-endpoint-url", s3_endpoint)
    replicas, balancer = [], None
    try:
        for name in ("first", "second"):
            replicas.append(RegistryProcess(tmp_path / name, postgres_url, tmp_path / f"{name}.log", *store_options))
        balancer = Balancer(tmp_path / "balancer", f"127.0.0.1:{free_port()}",
                            [f"127.0.0.1:{replica.port}" for replica in replicas], check_seconds=0.5).start()
        wait_until_answers(balancer.url + "/health", balancer.process, "the balancer")
        tokens = {"site": register_directly(postgres_url, store.SITE, ["hospital-a"])["hospital-a"],
                  "researcher": register_directly(postgres_url, store.RESEARCHER, ["alice"])["alice"]}
        yield balancer.url, replicas, tokens
    finally:
        if balancer is not None:
            balancer.stop()
        for replica in replicas:
            if replica.process.poll() is None:
                replica.stop()


def one_round(url, tokens, content):
    """A task posted, claimed by a long-polling site, its output uploaded and downloaded: all through url.
    Returns what the researcher downloaded."""
    site, researcher = bearer(tokens["site"]), bearer(tokens["researcher"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        claiming = pool.submit(requests.post, f"{url}/api/site/claim", json={"wait_seconds": 60}, headers=site,
                               timeout=90)
        task = requests.post(f"{url}/api/tasks", json={"image": IMAGE, "input": "{}"}, headers=researcher, timeout=30)
        task.raise_for_status()
        run = claiming.result(timeout=90).json()
    assert run["task_id"] == task.json()["id"]
    runs = f"{url}/api/site/runs/{run['id']}"
    requests.post(f"{runs}/start", json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64},
                  headers=site, timeout=30).raise_for_status()
    requests.put(f"{runs}/output", data=content, timeout=60, headers={
        **site, "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(content).hexdigest()}
    ).raise_for_status()
    requests.post(f"{runs}/finish", json={"lease_id": run["lease_id"], "exit_code": 0}, headers=site,
                  timeout=30).raise_for_status()
    downloaded = requests.get(f"{url}/api/runs/{run['id']}/output", headers=researcher, timeout=60)
    downloaded.raise_for_status()
    return downloaded.content


def test_a_round_goes_through_the_balancer_and_goes_on_when_a_replica_is_killed(replicated):
    url, replicas, tokens = replicated
    content = os.urandom(2 * 1024 * 1024)
    assert one_round(url, tokens, content) == content
    # The site's long-poll held a connection to one replica, so the task was posted through the other.
    assert all("POST /api/" in replica.log() for replica in replicas)

    replicas[0].process.send_signal(signal.SIGKILL)
    replicas[0].process.wait()

    assert requests.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    assert one_round(url, tokens, b"after the loss of a replica") == b"after the loss of a replica"


def test_an_upload_cut_by_a_replicas_death_is_sent_again_and_lands_once(replicated, tmp_path, s3, bucket):  # noqa: F811
    url, replicas, tokens = replicated
    site, researcher = bearer(tokens["site"]), bearer(tokens["researcher"])
    requests.post(f"{url}/api/tasks", json={"image": IMAGE, "input": "{}"}, headers=researcher,
                  timeout=30).raise_for_status()
    run = requests.post(f"{url}/api/site/claim", json={"wait_seconds": 0}, headers=site, timeout=30).json()
    content = os.urandom(1024 * 1024)
    sha256 = hashlib.sha256(content).hexdigest()
    host, port = url.removeprefix("http://").split(":")
    cut = socket.create_connection((host, int(port)), timeout=30)
    cut.sendall((f"PUT /api/site/runs/{run['id']}/output HTTP/1.1\r\nHost: registry\r\n"
                 f"Authorization: Bearer {tokens['site']}\r\nX-Lease-Id: {run['lease_id']}\r\n"
                 f"X-Content-SHA256: {sha256}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                + b"%x\r\n%s\r\n" % (65536, content[:65536]))
    receiving = wait_for(lambda: next((replica for replica in replicas
                                       if any((replica.data_dir / "incoming").glob("*"))), None),
                         "a replica receives the upload")
    receiving.process.send_signal(signal.SIGKILL)  # mid-upload
    receiving.process.wait()
    cut.close()

    (tmp_path / "output.tar.gz").write_bytes(content)  # the site runner's client sends it again, whole
    RegistryClient(url, tokens["site"], retry_for_seconds=60).upload(run["id"], run["lease_id"], "output",
                                                                      tmp_path / "output.tar.gz")

    downloaded = requests.get(f"{url}/api/runs/{run['id']}/output", headers=researcher, timeout=60)
    assert downloaded.status_code == 200 and downloaded.content == content
    assert [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])] == [f"results/{sha256}"]


def wait_for(found, what, timeout=30):
    """What found() returns once it is something; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while (value := found()) is None:
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return value
