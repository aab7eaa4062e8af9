"""The researcher library against a real registry and runner: inputs arrive byte for byte, results
are readable in memory and as files, and an unfinished or failed task says which site and why.

hospital-b is registered but has no runner: its runs stay pending until cancelled, and the tests
claim them themselves, as its runner would, to see the input the registry hands out.
"""

import base64
import gzip
import json
import time

import pytest
import requests

from common.names import MAX_INLINE_BYTES
from researcher import RunResult, TaskFailed, TaskTimeout, UnsafeOutput
from scripts.federation import IMAGE_REGISTRY, LocalFederation
from tests.test_researcher_boundaries import plain_tar

SUMMARY = f"{IMAGE_REGISTRY}/pht/summary:latest"


@pytest.fixture(scope="module")
def federation():
    with LocalFederation(site_names=("hospital-a", "hospital-b"), patients_per_site=30, start_runners=False) as fed:
        fed.start_runner("hospital-a")
        yield fed


@pytest.fixture
def registry(federation):
    return federation.researcher()


def claim_at_hospital_b(federation, task):
    """Claim the task's run at hospital-b through the site API, as its runner would; returns
    (the site's HTTP session, the claimed run)."""
    site = requests.Session()
    site.headers["Authorization"] = f"Bearer {federation.sites['hospital-b'].token}"
    claimed = site.post(f"{federation.registry_url}/api/site/claim", json={"wait_seconds": 0}, timeout=10)
    claimed.raise_for_status()
    assert claimed.json()["task_id"] == task["id"]
    return site, claimed.json()


def input_as_the_site_receives_it(federation, task):
    """Claim the task's run at hospital-b and download its input, which a small input's claim carries too."""
    site, run = claim_at_hospital_b(federation, task)
    received = site.get(f"{federation.registry_url}/api/site/runs/{run['id']}/input", timeout=10)
    received.raise_for_status()
    if len(received.content) <= MAX_INLINE_BYTES:
        assert base64.b64decode(run["input_base64"]) == received.content
    else:
        assert "input_base64" not in run
    return received.content


def complete_at_hospital_b(federation, task, **report):
    """Run the task at hospital-b as a runner reports it, without a container: claim, start, finish."""
    site, run = claim_at_hospital_b(federation, task)
    runs_url = f"{federation.registry_url}/api/site/runs/{run['id']}"
    site.post(f"{runs_url}/start", json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64},
              timeout=10).raise_for_status()
    site.post(f"{runs_url}/finish", json={"lease_id": run["lease_id"], "exit_code": 0, **report},
              timeout=10).raise_for_status()


@pytest.mark.parametrize("given, expected", [
    ({"min_count": 5, "label": "é"}, json.dumps({"min_count": 5, "label": "é"}).encode()),
    ("variables = age\n", b"variables = age\n"),
    (b"\x00\xffbinary\r\n", b"\x00\xffbinary\r\n"),
    (b"\xfe" * MAX_INLINE_BYTES, b"\xfe" * MAX_INLINE_BYTES),  # the largest a claim carries
    (b"\xfe" * (MAX_INLINE_BYTES + 1), b"\xfe" * (MAX_INLINE_BYTES + 1)),  # downloaded
])
def test_input_reaches_the_site_byte_for_byte(federation, registry, given, expected):
    task = registry.submit(SUMMARY, given, sites=["hospital-b"])
    try:
        assert input_as_the_site_receives_it(federation, task) == expected
    finally:
        registry.cancel(task["id"])


def test_input_from_a_file_is_sent_as_the_file_is(federation, registry, tmp_path):
    config = tmp_path / "config.json"
    config.write_bytes(b'{"variables": ["age"]}\n')
    task = registry.submit(SUMMARY, config, sites=["hospital-b"])
    try:
        assert input_as_the_site_receives_it(federation, task) == config.read_bytes()
    finally:
        registry.cancel(task["id"])


def test_results_in_memory_and_as_files(federation, registry, tmp_path):
    task = registry.submit(SUMMARY, {"variables": ["stage"], "min_count": 1}, sites=["hospital-a"], name="stages")
    [result] = registry.wait_for_results(task["id"], timeout_seconds=120)

    assert result.ok and result.exit_code == 0 and result.image_digest.startswith("sha256:")
    assert result.output["variables"]["stage"]["count"] == len(federation.sites["hospital-a"].patients)
    assert result.output == result.read_json("output.txt")
    assert "summary: 30 patients" in result.log
    folder = result.extract_to(tmp_path / "hospital-a")
    assert json.loads((folder / "output.txt").read_text()) == result.output

    [listed] = registry.tasks(session_id=task["session_id"])
    assert listed["name"] == "stages" and listed["status"] == "completed"


def test_a_task_that_does_not_finish_in_time_raises_and_can_be_cancelled(registry):
    task = registry.submit(SUMMARY, {"variables": ["stage"], "min_count": 1}, sites=["hospital-a", "hospital-b"])
    started = time.monotonic()
    with pytest.raises(TaskTimeout, match=rf"task {task['id']} not finished after 3 s \(.*hospital-b: pending\)"):
        registry.wait(task["id"], timeout_seconds=3)
    assert time.monotonic() - started < 10

    deadline = time.monotonic() + 60
    while registry.task(task["id"])["runs"][0]["status"] != "completed":  # hospital-a's run, before cancelling
        assert time.monotonic() < deadline, "hospital-a did not complete its run"
        time.sleep(0.2)
    registry.cancel(task["id"])
    with pytest.raises(TaskFailed) as failure:
        registry.wait_for_results(task["id"], timeout_seconds=120)
    assert "hospital-b cancelled: cancelled by the researcher" in str(failure.value)
    assert [result.site for result in failure.value.failed] == ["hospital-b"]

    completed, cancelled = registry.wait_for_results(task["id"], timeout_seconds=120, accept_partial=True)
    assert (completed.site, completed.status, cancelled.status) == ("hospital-a", "completed", "cancelled")
    assert completed.output["patients"] == 30 and cancelled.files == {} and cancelled.output is None


def test_each_result_carries_what_its_site_reported_of_the_sparql_gateway(federation, registry):
    summary = {"queries": 12, "bytes": 3_400_000, "refused": 1}
    with_gateway = registry.submit(SUMMARY, {}, sites=["hospital-b"])
    complete_at_hospital_b(federation, with_gateway, sparql=summary)
    without_gateway = registry.submit(SUMMARY, {}, sites=["hospital-b"])
    complete_at_hospital_b(federation, without_gateway)

    [reported] = registry.wait_for_results(with_gateway["id"], timeout_seconds=30)
    [unreported] = registry.wait_for_results(without_gateway["id"], timeout_seconds=30)
    assert (reported.sparql, unreported.sparql) == (summary, None)
    assert registry.task(with_gateway["id"])["runs"][0]["sparql"] == summary


def test_sites_report_whether_their_runner_is_online_and_their_sparql_answers(registry):
    deadline = time.monotonic() + 30
    while not (sites := {site["name"]: site for site in registry.sites()})["hospital-a"]["online"]:
        assert time.monotonic() < deadline, "hospital-a's runner never polled the registry"
        time.sleep(0.2)
    assert sites["hospital-a"]["sparql_ok"] is True
    assert set(sites) == {"hospital-a", "hospital-b"}


def archive_of(files):
    return gzip.compress(plain_tar(files))


@pytest.fixture
def a_result(tmp_path):
    """A RunResult of the output files given, from an archive on disk as a caller may have one."""
    def make(files):
        archive = tmp_path / "output.tar.gz"
        archive.write_bytes(archive_of(files))
        return RunResult(run_id=1, site="hospital-x", status="completed", reason=None, exit_code=0,
                         image_digest="sha256:00", archive_path=archive)
    return make


def test_output_txt_is_parsed_only_when_it_is_json(a_result):
    assert a_result({"output.txt": b'{"n": 3}'}).output == {"n": 3}
    assert a_result({"output.txt": b"3 patients\n"}).output == "3 patients\n"
    assert a_result({"result.csv": b"n\n3\n"}).output is None


def test_output_files_are_read_on_demand_as_a_mapping(a_result):
    result = a_result({"output.txt": b"{}", "tables/counts.csv": b"n\n3\n"})
    assert sorted(result.files) == ["output.txt", "tables/counts.csv"] and len(result.files) == 2
    assert "tables/counts.csv" in result.files and "missing" not in result.files
    assert dict(result.files.items()) == {"output.txt": b"{}", "tables/counts.csv": b"n\n3\n"}
    assert result.read_text("tables/counts.csv") == "n\n3\n" and result.log == ""
    with pytest.raises(KeyError):
        result.files["missing"]


def test_closing_a_result_made_from_a_callers_files_leaves_them(a_result, tmp_path):
    """Only downloads the library made are removed: a RunResult made from a caller's own files is theirs."""
    result = a_result({"output.txt": b"{}"})
    with result:
        assert result.output == {}
    assert (tmp_path / "output.tar.gz").exists()


def test_extracting_refuses_paths_outside_the_folder(a_result, tmp_path):
    """An output archive comes from another organisation's machine; it must not write outside the folder."""
    result = a_result({"../escaped.txt": b"x"})
    with pytest.raises(UnsafeOutput, match="not a path inside /output/"):
        result.extract_to(tmp_path / "results")
    assert not (tmp_path / "escaped.txt").exists()
