"""An ended task's small results travel with the answer that ends the researcher's wait (API 1.5, with_results):
no download request each, and checked as downloads are, whatever the registry sends."""

import base64
import hashlib
import logging
import re

import pytest

from master import researcher_api
from researcher import ChecksumMismatch, RegistryError, ResultLimits, ResultTooLarge
from researcher.client import carried_results
from tests.test_registry_api import alice, claim, hospital, post_task, start, upload  # noqa: F401 (fixtures)
from tests.test_researcher_boundaries import archive_of, federation, files_below  # noqa: F401 (fixture)

LARGER_THAN_CARRIED = 48 * 1024 + 1


@pytest.fixture
def downloads_asked(caplog):
    """The result downloads the registry answered from now on: [(run id, kind)]."""
    caplog.set_level(logging.INFO, logger="pht.registry")
    return lambda: [(int(run), kind) for run, kind in
                    re.findall(r"GET /api/runs/(\d+)/(output|log) -> 200", caplog.text)]


def test_a_waited_tasks_small_results_come_with_it_and_only_larger_ones_are_downloaded(
        federation, tmp_path, downloads_asked):  # noqa: F811
    federation.add_site("hospital-b")
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"output.txt": b'{"n": 1}'}), log=b"a done\n")
    federation.report("hospital-b", task["id"], output=archive_of({"output.txt": b'{"n": 2}'}),
                      log=b"b" * LARGER_THAN_CARRIED)
    registry = federation.registry(download_dir=tmp_path / "downloads")

    ended = registry.wait(task["id"], progress=False)
    assert all("output_base64" not in run and "log_base64" not in run for run in ended["runs"])  # kept aside
    results = registry.results(ended)

    assert [(result.site, result.output, len(result.log)) for result in results] == [
        ("hospital-a", {"n": 1}, 7), ("hospital-b", {"n": 2}, LARGER_THAN_CARRIED)]
    assert downloads_asked() == [(federation.run_of(task["id"], "hospital-b")["id"], "log")]
    # Taken once: asked again, they are downloaded.
    assert [result.output for result in registry.results(ended)] == [{"n": 1}, {"n": 2}]
    assert len(downloads_asked()) == 5


def test_a_carried_result_that_is_not_the_one_listed_is_refused_and_not_kept(federation, tmp_path):  # noqa: F811
    output = archive_of({"output.txt": b'{"n": 3}'})
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=output, log=b"done\n")
    run = federation.run_of(task["id"], "hospital-a")
    tampered = bytearray(output)
    tampered[-1] ^= 1
    federation.blob_path(run["output_sha256"]).write_bytes(bytes(tampered))
    registry = federation.registry(download_dir=tmp_path / "downloads")

    ended = registry.wait(task["id"], progress=False)
    assert registry._carried, "the registry carried no result: this test tests nothing"
    with pytest.raises(ChecksumMismatch, match=f"the output of run {run['id']} from hospital-a"):
        registry.results(ended)
    assert files_below(tmp_path / "downloads") == set()


def test_a_carried_result_stops_at_its_cap_whatever_size_the_registry_lists(federation, tmp_path):  # noqa: F811
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"output.txt": b"{}"}), log=b"x" * 5000)
    registry = federation.registry(limits=ResultLimits(max_log_bytes=1000), download_dir=tmp_path / "downloads")
    ended = registry.wait(task["id"], progress=False)
    understated = {**ended, "runs": [{**run, "log_size": 10} for run in ended["runs"]]}

    with pytest.raises(ResultTooLarge, match=r"the log of .*max_log_bytes"):
        registry.results(understated)
    assert files_below(tmp_path / "downloads") == set()


@pytest.mark.parametrize("text", ["not base64!", "QQ", "\u00e9t\u00e9"])
def test_a_carried_result_that_is_not_base64_is_refused(federation, tmp_path, text):  # noqa: F811
    task = federation.submit()
    federation.report("hospital-a", task["id"], output=archive_of({"output.txt": b"{}"}), log=b"done\n")
    registry = federation.registry(download_dir=tmp_path / "downloads")
    # What a compromised registry's answer to the wait could carry.
    ended = registry.task(task["id"])
    ended["runs"][0]["log_base64"] = text
    registry._carried = carried_results(ended)

    with pytest.raises(RegistryError, match="the log of run .* from hospital-a that the registry sent within its "
                                            "task is not base64"):
        registry.results(ended)
    assert files_below(tmp_path / "downloads") == set()


def test_what_is_carried_that_is_not_text_is_left_out_and_downloaded():
    task = {"runs": [{"id": 1, "output_sha256": "a" * 64, "output_base64": 5, "log_sha256": "b" * 64,
                      "log_base64": "eA=="}, "not a run"]}
    assert carried_results(task) == {(1, "log"): ("b" * 64, "eA==")}
    assert "output_base64" not in task["runs"][0] and "log_base64" not in task["runs"][0]


# --- the registry's side --------------------------------------------------------------------------------------

def finish_with(client, site, run, output, log):
    lease = {"lease_id": run["lease_id"]}
    assert start(client, site, run).status_code == 204
    assert client.post(f"/api/site/runs/{run['id']}/finish", headers=site, json={
        **lease, "exit_code": 0, "output_base64": base64.b64encode(output).decode(),
        "log_base64": base64.b64encode(log).decode()}).status_code == 200


def task_with_results(client, researcher, task_id, **query):
    answer = client.get(f"/api/tasks/{task_id}", headers=researcher, query_string={"with_results": "true", **query})
    assert answer.status_code == 200, answer.json
    return answer.json


def test_only_an_ended_task_asked_with_results_carries_them(app, client, alice, hospital):  # noqa: F811
    task_id = post_task(client, alice).json["id"]
    run = claim(client, hospital).json
    assert "output_base64" not in task_with_results(client, alice, task_id)["runs"][0]  # still active
    finish_with(client, hospital, run, b"the output", b"the log")

    carried = task_with_results(client, alice, task_id)["runs"][0]
    assert (carried["output_base64"], carried["log_base64"]) == ("dGhlIG91dHB1dA==", "dGhlIGxvZw==")
    assert "output_base64" not in client.get(f"/api/tasks/{task_id}", headers=alice).json["runs"][0]


def test_an_answers_carried_results_stay_within_its_bound(app, client, alice, make_site, monkeypatch):  # noqa: F811
    sites = [make_site(f"hospital-{letter}") for letter in "abc"]
    task_id = post_task(client, alice, sites=["hospital-a", "hospital-b", "hospital-c"]).json["id"]
    for site in sites:
        finish_with(client, site, claim(client, site).json, b"o" * 100, b"l" * 100)
    monkeypatch.setattr(researcher_api, "MAX_CARRIED_BYTES", 350)

    runs = task_with_results(client, alice, task_id)["runs"]
    assert [("output_base64" in run, "log_base64" in run) for run in runs] == [
        (True, True), (True, False), (False, False)]


def test_small_results_uploaded_by_requests_of_their_own_are_carried_too_unless_lost(
        app, client, alice, make_site, caplog):  # noqa: F811
    sites = [make_site(f"hospital-{letter}") for letter in "abc"]
    task_id = post_task(client, alice, sites=["hospital-a", "hospital-b", "hospital-c"]).json["id"]
    for site, body in zip(sites[:2], (b"first", b"second")):  # as runners before API 1.4 report
        run = claim(client, site).json
        start(client, site, run)
        for kind, data in (("output", body), ("log", body + b" log")):
            assert upload(client, site, run, kind, data).status_code == 200
        assert client.post(f"/api/site/runs/{run['id']}/finish", headers=site,
                           json={"lease_id": run["lease_id"], "exit_code": 0}).status_code == 200
    finish_with(client, sites[2], claim(client, sites[2]).json, b"third", b"third log")
    lost = task_with_results(client, alice, task_id)["runs"][0]
    app.extensions["pht"].blobs.path_of(lost["output_sha256"]).unlink()

    runs = task_with_results(client, alice, task_id)["runs"]
    assert [(run.get("output_base64"), run.get("log_base64")) for run in runs] == [
        (None, "Zmlyc3QgbG9n"), ("c2Vjb25k", "c2Vjb25kIGxvZw=="), ("dGhpcmQ=", "dGhpcmQgbG9n")]
    assert f"the output of run {lost['id']} is not carried in its task" in caplog.text


def test_a_finish_reports_results_are_kept_with_it_in_the_database_and_download(
        app, client, alice, hospital):  # noqa: F811
    task_id = post_task(client, alice).json["id"]
    run = claim(client, hospital).json
    finish_with(client, hospital, run, b"the output", b"the log")

    blob_files = [path for path in app.extensions["pht"].blobs.root.rglob("*") if path.is_file()]
    assert blob_files == []  # no file each in the result store: a row each, committed with the report
    for kind, data in (("output", b"the output"), ("log", b"the log")):
        answer = client.get(f"/api/runs/{run['id']}/{kind}", headers=alice)
        assert answer.status_code == 200 and answer.data == data
        assert answer.headers["X-Content-SHA256"] == hashlib.sha256(data).hexdigest()
    assert task_with_results(client, alice, task_id)["runs"][0]["log_base64"] == "dGhlIGxvZw=="
