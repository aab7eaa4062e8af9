"""An ended task's small results travel with the answer that ends the researcher's wait (API 1.5, with_results):
no download request each, and checked as downloads are, whatever the registry sends."""

import base64
import hashlib
import logging
import re
import tracemalloc

import pytest
from sqlalchemy import event

from master import researcher_api
from researcher import ChecksumMismatch, RegistryError, ResultLimits, ResultTooLarge
from researcher.client import Registry, carried_results
from tests.test_registry_api import alice, claim, finish_carrying, hospital, post_task, start, upload  # noqa: F401,E501
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


# --- found by an attacker's review -----------------------------------------------------------------------------

def sha(data):
    return hashlib.sha256(data).hexdigest()


# On PostgreSQL, INSERT ... ON CONFLICT DO NOTHING waits for another transaction's uncommitted row of the same key.
# Run A reporting (output=P, log=Q) while run B reports (output=Q, log=P) -- two runs of one site at once, or two
# sites -- lock P then Q and Q then P: a deadlock, which PostgreSQL ends by failing one report (an OperationalError:
# 500). Rows taken in one order (by sha256) cannot wait on each other in a cycle.

def test_a_finish_keeps_its_small_results_in_sha256_order_so_two_reports_cannot_deadlock(
        app, client, alice, hospital):  # noqa: F811
    first, second = sorted([b"alpha\n", b"beta\n"], key=sha)
    post_task(client, alice)
    run = claim(client, hospital).json
    inserted = []

    def note(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO SMALL_RESULTS"):
            # One statement of many VALUES (insertmanyvalues, flat parameters) or an executemany: the sha256s, in
            # the order the database takes their rows.
            rows = parameters if executemany else [parameters]
            flat = [value for row in rows for value in (row.values() if isinstance(row, dict) else row)]
            inserted.extend(value for value in flat if isinstance(value, str) and len(value) == 64)

    engine = app.extensions["pht"].engine
    event.listen(engine, "before_cursor_execute", note)
    try:
        # The output's sha256 sorts after the log's: the other run reports them the other way round.
        assert finish_carrying(client, hospital, run, output=second, log=first).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", note)
    assert inserted == [sha(first), sha(second)], "rows locked in report order: two crossed reports deadlock"


class _FailingRead:
    """A blob whose body fails half-way, as an S3 body does when the connection resets (or a disk's EIO)."""

    def read(self, *_):
        raise OSError("Input/output error")

    def close(self):
        pass


def test_a_result_store_that_fails_mid_read_leaves_that_result_out_of_the_task_not_500(
        app, client, alice, hospital):  # noqa: F811
    task_id = post_task(client, alice).json["id"]
    run = claim(client, hospital).json
    start(client, hospital, run)
    # As a runner before API 1.4 reports: small results uploaded by PUT, so they live in the result store.
    for kind, data in (("output", b"the output"), ("log", b"the log")):
        assert upload(client, hospital, run, kind, data).status_code == 200
    assert client.post(f"/api/site/runs/{run['id']}/finish", headers=hospital,
                       json={"lease_id": run["lease_id"], "exit_code": 0}).status_code == 200
    app.config["PROPAGATE_EXCEPTIONS"] = False  # answer as the served registry does
    app.extensions["pht"].blobs.open = lambda sha256, size: _FailingRead()

    answer = client.get(f"/api/tasks/{task_id}", headers=alice, query_string={"with_results": "true"})
    assert answer.status_code == 200, (answer.status_code, answer.get_data(as_text=True)[:200])
    assert "output_base64" not in answer.json["runs"][0]  # left out: downloading it says what is wrong


@pytest.mark.parametrize("odd_id", [[1], {"a": 1}])
def test_a_carried_result_of_a_run_with_an_unhashable_id_is_left_out_not_a_type_error(odd_id):
    task = {"runs": [{"id": odd_id, "status": "completed", "output_sha256": "a" * 64, "output_base64": "eA=="}]}
    # wait() calls this on the ended task; a TypeError here escapes wait() where results() would have said
    # RegistryError("the registry listed a run the library cannot use").
    assert carried_results(task) == {}


def test_a_carried_result_over_its_cap_is_refused_before_it_is_decoded_whole(tmp_path):
    cap = 1000
    text = base64.b64encode(b"x" * (4 * 1024 * 1024)).decode()  # what a hostile registry's answer carried
    registry = Registry("http://127.0.0.1:9", "token")
    registry._carried = {(1, "log"): ("a" * 64, text)}

    tracemalloc.start()
    try:
        with pytest.raises(ResultTooLarge):
            registry._receive(1, "log", tmp_path / "log", "a" * 64, "the log of run 1", "max_log_bytes", cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak} bytes held for a result capped at {cap}"
