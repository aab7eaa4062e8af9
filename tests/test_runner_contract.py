"""The container contract (docs/container-contract.md), as an algorithm sees it at a real site:
files, environment, user and limits, /temp per session, exit codes, and images written for
the original PyTaskManager running unchanged."""

import base64

import pytest

from client.sparql_gateway import ENDPOINT_IN_CONTAINER
from scripts.federation import LocalFederation
from tests.images import (engine_or_fail, only_run, output_files, output_json, pushed_test_image,
                          registry_digest, run_log)

SITE = "hospital-a"
SETTINGS = {
    "endpoint_type": "sparql",
    "endpoint_token": "token-for-the-endpoint",
    "container": {"network": "none", "memory": "128m", "pids": 64},
}


@pytest.fixture(scope="module")
def federation():
    engine_or_fail()
    with LocalFederation(site_names=(SITE,), patients_per_site=5, container_network="none",
                         site_settings=SETTINGS) as federation:
        yield federation


@pytest.fixture(scope="module")
def probe():
    return pushed_test_image("contract-probe")


def test_what_the_algorithm_sees(federation, probe):
    task_input = b'{"not": "only text"}\r\n\x00\xff\xfe binary \xe9 bytes'
    task = federation.researcher().submit(probe, task_input)
    run = only_run(federation, task)

    assert run["status"] == "completed", run["reason"]
    assert run["exit_code"] == 0
    assert run["image_digest"] == registry_digest(probe)
    seen = output_json(federation, run, "seen.json")
    assert base64.b64decode(seen["input_base64"]) == task_input
    assert seen["input_txt_is_the_input"]
    endpoint = ENDPOINT_IN_CONTAINER  # the run's SPARQL gateway, never the real endpoint
    assert seen["environment"] == {
        "SPARQL_ENDPOINT": endpoint,
        "TASK_ID": str(task["id"]),
        "SESSION_ID": str(task["session_id"]),
        "SITE_NAME": SITE,
        "RUN_ID": str(task["session_id"]),
        "endpointUrl": endpoint,
        "endpointType": "sparql",
        "endpointToken": "token-for-the-endpoint",
    }
    assert (seen["uid"], seen["gid"]) == (65534, 65534)
    assert int(seen["effective_capabilities"], 16) == 0
    assert seen["no_new_privileges"] == "1"
    assert seen["writable"] == {"/": False, "/etc": False, "/app": False, "/input": False,
                                "/output": True, "/temp": True, "/tmp": True}
    assert not seen["docker_socket_present"]
    assert int(seen["memory_limit"]) == 128 * 1024 ** 2
    assert seen["pids_limit"] == "64"


def test_output_folder_is_the_result_and_stdout_and_stderr_the_log(federation, probe):
    run = only_run(federation, federation.researcher().submit(probe, "{}"))
    # Only what the algorithm wrote: no empty /output.txt of the PyTaskManager convention.
    assert set(output_files(federation, run)) == {"seen.json"}
    log = run_log(federation, run)
    assert "probe: on stdout" in log and "probe: on stderr" in log


def test_exit_code_other_than_zero_fails_the_run(federation, probe):
    run = only_run(federation, federation.researcher().submit(probe, {"exit": 3}))
    assert run["status"] == "failed"
    assert run["exit_code"] == 3
    assert run["reason"] == "algorithm exited with code 3"
    assert "seen.json" in output_files(federation, run)  # what it wrote still helps to find out why


def test_temp_persists_across_the_tasks_of_a_session_and_not_across_sessions(federation, probe):
    researcher = federation.researcher()
    first = researcher.submit(probe, "{}")
    second = researcher.submit(probe, "{}", session_id=first["session_id"])
    other_session = researcher.submit(probe, "{}")

    starts_before = [output_json(federation, only_run(federation, task), "seen.json")["temp_starts_before"]
                     for task in (first, second, other_session)]
    assert starts_before == [0, 1, 0]


def test_image_written_for_the_original_pytaskmanager_runs_unchanged(federation):
    image = pushed_test_image("pytaskmanager-style")
    researcher = federation.researcher()
    first = researcher.submit(image, "age > 50")
    second = researcher.submit(image, "age > 60", session_id=first["session_id"])

    answers = []
    for task in (first, second):
        run = only_run(federation, task)
        assert run["status"] == "completed", run["reason"]
        assert set(output_files(federation, run)) == {"output.txt"}
        answers.append(output_json(federation, run, "output.txt"))
        assert f"internal log: round {len(answers)} of run {first['session_id']}" in run_log(federation, run)
    endpoint = ENDPOINT_IN_CONTAINER  # the run's SPARQL gateway, never the real endpoint
    assert answers == [
        {"input": "age > 50", "runId": str(first["session_id"]), "round": 1,
         "endpointUrl": endpoint, "endpointType": "sparql", "endpointToken": "token-for-the-endpoint"},
        {"input": "age > 60", "runId": str(first["session_id"]), "round": 2,
         "endpointUrl": endpoint, "endpointType": "sparql", "endpointToken": "token-for-the-endpoint"},
    ]
