"""The registry's REST API through Flask's test client, on a fresh database per test."""

import base64
import hashlib
import re
import threading
import time

import pytest

from common.names import MAX_INLINE_BYTES
from master import store

IMAGE = "127.0.0.1:5050/pht/patient-count:latest"


@pytest.fixture
def alice(make_researcher):
    return make_researcher("alice")


@pytest.fixture
def hospital(make_site):
    return make_site("hospital-a")


def post_task(client, researcher, **fields):
    body = {"image": IMAGE, "input": '{"label": "x"}', "sites": ["hospital-a"], **fields}
    return client.post("/api/tasks", json={k: v for k, v in body.items() if v is not None}, headers=researcher)


def claim(client, site, wait_seconds=0):
    return client.post("/api/site/claim", json={"wait_seconds": wait_seconds}, headers=site)


def upload(client, site, run, kind, body, sha256=None):
    return client.put(f"/api/site/runs/{run['id']}/{kind}", data=body, headers={
        **site, "X-Lease-Id": run["lease_id"], "X-Content-SHA256": sha256 or hashlib.sha256(body).hexdigest(),
        "Content-Type": "application/octet-stream"})


def start(client, site, run):
    return client.post(f"/api/site/runs/{run['id']}/start", headers=site,
                       json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "0" * 64})


def finish(client, site, run, exit_code=0, failure_reason=None, **more):
    """Report the run's end; a run that completes must have started, so it is started first if it was not."""
    if exit_code == 0 and failure_reason is None:
        start(client, site, run)
    return client.post(f"/api/site/runs/{run['id']}/finish", headers=site, json={
        "lease_id": run["lease_id"], "exit_code": exit_code, "failure_reason": failure_reason, **more})


def test_health_needs_no_token(client):
    assert client.get("/health").json == {"status": "ok"}


def test_posted_task_creates_one_pending_run_per_site(client, alice, make_site):
    make_site("hospital-a")
    make_site("hospital-b")
    response = post_task(client, alice, sites=None)
    assert response.status_code == 201
    task = response.json
    assert [(r["site"], r["status"]) for r in task["runs"]] == [("hospital-a", "pending"), ("hospital-b", "pending")]
    assert task["status"] == "active"


def test_input_is_stored_byte_exact(client, alice, hospital):
    odd_bytes = b"\x00\xff weird \r\n bytes"
    post_task(client, alice, input=None, input_base64=base64.b64encode(odd_bytes).decode())
    run = claim(client, hospital).json
    assert client.get(f"/api/site/runs/{run['id']}/input", headers=hospital).data == odd_bytes


def test_a_claim_carries_a_small_input_and_leaves_a_larger_one_to_download(client, alice, hospital):
    largest = b"\xfe" * MAX_INLINE_BYTES
    for given in (b"\x00\xff weird \r\n bytes", largest, largest + b"!"):
        post_task(client, alice, input=None, input_base64=base64.b64encode(given).decode())
        run = claim(client, hospital).json
        carried = base64.b64decode(run["input_base64"]) if "input_base64" in run else None
        assert carried == (given if len(given) <= MAX_INLINE_BYTES else None)
        assert client.get(f"/api/site/runs/{run['id']}/input", headers=hospital).data == given


def test_a_claim_names_the_researcher_so_a_site_can_check_their_keys(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert run["researcher"] == "alice"
    assert run["recipients"] == []


PINNED = IMAGE + "@sha256:" + "c" * 64


def test_a_claim_asked_to_start_a_pinned_run_starts_it_with_the_digest_it_is_pinned_to(client, alice, hospital):
    post_task(client, alice, image=PINNED)
    run = client.post("/api/site/claim", json={"start_pinned": True}, headers=hospital).json
    assert run["started"] is True
    [listed] = client.get(f"/api/tasks/{run['task_id']}", headers=alice).json["runs"]
    assert (listed["status"], listed["image_digest"]) == ("running", "sha256:" + "c" * 64)
    assert start(client, hospital, run).status_code == 409, "a started run was started again"
    assert client.post(f"/api/site/runs/{run['id']}/finish", headers=hospital,
                       json={"lease_id": run["lease_id"], "exit_code": 0}).status_code == 200
    history = [e["status"] for e in client.get(f"/api/runs/{run['id']}/history", headers=alice).json]
    assert history == ["pending", "claimed", "running", "completed"]


@pytest.mark.parametrize("image, start_pinned", [(IMAGE, True), (PINNED, False)])
def test_a_claim_starts_nothing_but_a_pinned_run_it_was_asked_to(client, alice, hospital, image, start_pinned):
    post_task(client, alice, image=image)
    run = client.post("/api/site/claim", json={"start_pinned": start_pinned}, headers=hospital).json
    assert run["started"] is False
    [listed] = client.get(f"/api/tasks/{run['task_id']}", headers=alice).json["runs"]
    assert listed["status"] == "claimed"


def test_a_run_its_claim_started_can_still_be_refused(client, alice, hospital):
    post_task(client, alice, image=PINNED)
    run = client.post("/api/site/claim", json={"start_pinned": True}, headers=hospital).json
    assert client.post(f"/api/site/runs/{run['id']}/refuse", headers=hospital,
                       json={"lease_id": run["lease_id"], "reason": "not on this site's whitelist"}).status_code == 204
    [listed] = client.get(f"/api/tasks/{run['task_id']}", headers=alice).json["runs"]
    assert (listed["status"], listed["image_digest"]) == ("refused", None)


@pytest.mark.parametrize("fields, complaint", [
    ({"image": "Not An Image!"}, "image"),
    ({"sites": ["nowhere"]}, "unknown site"),
    ({"surprise": 1}, "surprise"),
    ({"input": None}, "input"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
    ({"session_id": 999}, "session 999"),
    ({"session_id": 2 ** 70}, "session_id"),         # beyond the database's integers
    ({"input": "\ud800"}, "lone surrogates"),        # valid JSON, not storable text
    ({"name": "\udfff"}, "lone surrogates"),
    ({"input": None, "input_base64": "!!"}, "base64"),
    ({"input": None, "input_base64": "\u00e9t\u00e9"}, "base64"),  # non-ASCII is not base64 either
    ({"sites": []}, "sites"),
])
def test_bad_task_input_is_rejected_with_a_message(client, alice, hospital, fields, complaint):
    body = {"image": IMAGE, "input": "{}", "sites": ["hospital-a"], **fields}
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/api/tasks", json=body, headers=alice)
    assert 400 <= response.status_code < 500
    assert complaint in response.get_data(as_text=True)
    assert client.get("/api/tasks/1", headers=alice).status_code == 404  # nothing half-stored


def test_impossible_ids_and_numbers_are_client_errors(client, alice, hospital):
    assert client.get("/api/tasks/99999999999999999999", headers=alice).status_code == 404
    assert client.get("/api/tasks", query_string={"page": 10 ** 12}, headers=alice).status_code == 422
    post_task(client, alice)
    run = claim(client, hospital).json
    assert finish(client, hospital, run, exit_code=2 ** 40).status_code == 422
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["status"] == "claimed"


def test_oversized_input_is_rejected(app, client, alice, hospital):
    limit = app.extensions["pht"].settings.max_input_bytes
    response = post_task(client, alice, input="x" * (limit + 1))
    assert response.status_code == 413
    assert client.get("/api/tasks", headers=alice).json["total"] == 0


def test_malformed_json_is_a_client_error(client, alice, hospital):
    response = client.post("/api/tasks", data="{not json", headers={**alice, "Content-Type": "application/json"})
    assert response.status_code in (400, 422)


def test_tokens_and_roles_are_enforced(client, alice, hospital, make_researcher):
    assert client.get("/api/sites").status_code == 401
    assert client.get("/api/sites", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/sites", headers=hospital).status_code == 403  # a site may not list sites
    assert claim(client, alice).status_code == 403  # a researcher may not claim runs
    task_id = post_task(client, alice).json["id"]
    bob = make_researcher("bob")
    assert client.get(f"/api/tasks/{task_id}", headers=bob).status_code == 404  # not bob's


def test_revoked_token_is_refused(app, client, alice, hospital):
    store.revoke_principal(app.extensions["pht"].engine, store.SITE, "hospital-a")
    assert claim(client, hospital).status_code == 401


def test_a_run_goes_from_claim_to_completed_with_its_results(client, alice, hospital):
    task_id = post_task(client, alice).json["id"]
    run = claim(client, hospital).json
    assert run["image"] == IMAGE and run["lease_id"]
    assert claim(client, hospital).status_code == 204  # the only run is taken
    started = client.post(f"/api/site/runs/{run['id']}/start", headers=hospital,
                          json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "d" * 64})
    assert started.status_code == 204
    assert upload(client, hospital, run, "output", b"archive bytes").status_code == 200
    assert upload(client, hospital, run, "log", b"hello\n").status_code == 200
    assert finish(client, hospital, run).json == {"status": "completed"}

    task = client.get(f"/api/tasks/{task_id}", headers=alice).json
    assert task["status"] == "completed"
    assert task["runs"][0]["image_digest"] == "sha256:" + "d" * 64
    output = client.get(f"/api/runs/{run['id']}/output", headers=alice)
    assert output.data == b"archive bytes"
    assert output.headers["X-Content-SHA256"] == hashlib.sha256(b"archive bytes").hexdigest()
    assert client.get(f"/api/runs/{run['id']}/log", headers=alice).data == b"hello\n"
    history = [e["status"] for e in client.get(f"/api/runs/{run['id']}/history", headers=alice).json]
    assert history == ["pending", "claimed", "running", "completed"]


def finish_carrying(client, site, run, **results):
    """The finish report with the run's output and log in it (base64), as a runner sends small ones."""
    start(client, site, run)
    return client.post(f"/api/site/runs/{run['id']}/finish", headers=site, json={
        "lease_id": run["lease_id"], "exit_code": 0,
        **{f"{kind}_base64": base64.b64encode(data).decode() for kind, data in results.items()}})


def test_a_finish_report_carries_a_small_output_and_log_in_one_request(client, alice, hospital):
    task_id = post_task(client, alice).json["id"]
    run = claim(client, hospital).json
    assert run["inline_result_bytes"] == MAX_INLINE_BYTES
    largest = b"\x1f\x8b" + b"\xfe" * (MAX_INLINE_BYTES - 2)
    assert finish_carrying(client, hospital, run, output=largest, log=b"hello\n").json == {"status": "completed"}

    [listed] = client.get(f"/api/tasks/{task_id}", headers=alice).json["runs"]
    assert (listed["output_sha256"], listed["log_sha256"]) == (hashlib.sha256(largest).hexdigest(),
                                                               hashlib.sha256(b"hello\n").hexdigest())
    assert client.get(f"/api/runs/{run['id']}/output", headers=alice).data == largest
    assert client.get(f"/api/runs/{run['id']}/log", headers=alice).data == b"hello\n"
    # Sent again, as a runner whose answer was lost does: the same report; with another log, a conflict.
    assert finish_carrying(client, hospital, run, output=largest, log=b"hello\n").status_code == 200
    assert finish_carrying(client, hospital, run, output=largest, log=b"other\n").status_code == 409
    assert client.get(f"/api/runs/{run['id']}/log", headers=alice).data == b"hello\n"


def test_a_finish_report_takes_a_result_alongside_one_uploaded_before(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert upload(client, hospital, run, "output", b"x" * (MAX_INLINE_BYTES + 1)).status_code == 200
    assert finish_carrying(client, hospital, run, log=b"log\n").json == {"status": "completed"}
    assert client.get(f"/api/runs/{run['id']}/output", headers=alice).data == b"x" * (MAX_INLINE_BYTES + 1)
    assert client.get(f"/api/runs/{run['id']}/log", headers=alice).data == b"log\n"


@pytest.mark.parametrize("field, value", [
    ("output_base64", base64.b64encode(b"x" * (MAX_INLINE_BYTES + 1)).decode()),
    ("log_base64", "not base64!"), ("log_base64", "QUJD\n"), ("output_base64", 5), ("log_base64", ["QUJD"]),
])
def test_a_bad_result_in_a_finish_report_is_refused_and_the_run_stays_open(client, alice, hospital, field, value):
    post_task(client, alice)
    run = claim(client, hospital).json
    start(client, hospital, run)
    answer = client.post(f"/api/site/runs/{run['id']}/finish", headers=hospital,
                         json={"lease_id": run["lease_id"], "exit_code": 0, field: value})
    assert answer.status_code == 422 and field in answer.json["detail"]["json"]
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["status"] == "running"


def test_a_result_in_a_finish_report_after_a_cancel_is_not_kept(app, client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    start(client, hospital, run)
    client.post("/api/tasks/1/cancel", headers=alice)
    answer = client.post(f"/api/site/runs/{run['id']}/finish", headers=hospital, json={
        "lease_id": run["lease_id"], "exit_code": 0, "output_base64": base64.b64encode(b"late").decode()})
    assert answer.status_code == 409
    late = hashlib.sha256(b"late").hexdigest()
    assert store.small_results_of(app.extensions["pht"].engine, [late]) == {}
    assert not app.extensions["pht"].blobs.path_of(late).exists()


def test_non_zero_exit_fails_the_run_with_reason(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert finish(client, hospital, run, exit_code=2).json == {"status": "failed"}
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["reason"] == "algorithm exited with code 2"


def test_runner_side_failure_is_recorded_with_its_reason(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert finish(client, hospital, run, exit_code=None, failure_reason="timeout: still running after 5 s").json == {
        "status": "failed"}
    stored = client.get("/api/tasks/1", headers=alice).json["runs"][0]
    assert (stored["exit_code"], stored["reason"]) == (None, "timeout: still running after 5 s")


def test_a_running_run_learns_of_its_cancel_at_the_next_heartbeat(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    client.post(f"/api/site/runs/{run['id']}/start", headers=hospital,
                json={"lease_id": run["lease_id"], "image_digest": "sha256:" + "e" * 64})
    beat = lambda: client.post(f"/api/site/runs/{run['id']}/heartbeat", headers=hospital,
                               json={"lease_id": run["lease_id"]}).json
    assert beat() == {"status": "running"}
    client.post("/api/tasks/1/cancel", headers=alice)
    assert beat() == {"status": "cancelled"}
    assert upload(client, hospital, run, "output", b"late").status_code == 409  # nothing lands after a cancel
    history = [e["status"] for e in client.get(f"/api/runs/{run['id']}/history", headers=alice).json]
    assert history == ["pending", "claimed", "running", "cancelled"]


def test_same_upload_twice_is_idempotent_and_a_different_one_conflicts(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert upload(client, hospital, run, "output", b"first").status_code == 200
    assert upload(client, hospital, run, "output", b"first").status_code == 200
    assert upload(client, hospital, run, "output", b"second").status_code == 409
    finish(client, hospital, run)
    assert finish(client, hospital, run).status_code == 200  # same report again
    assert finish(client, hospital, run, exit_code=1).status_code == 409


SPARQL_SUMMARY = {"queries": 12, "bytes": 3_400_000, "refused": 1}


def test_the_sites_sparql_summary_reaches_every_run_record_the_researcher_sees(client, alice, make_site):
    site_a, site_b = make_site("hospital-a"), make_site("hospital-b")
    task_id = post_task(client, alice, sites=["hospital-a", "hospital-b"]).json["id"]
    assert [run["sparql"] for run in client.get(f"/api/tasks/{task_id}", headers=alice).json["runs"]] == [None, None]
    finish(client, site_a, claim(client, site_a).json, sparql=SPARQL_SUMMARY)
    finish(client, site_b, claim(client, site_b).json)  # a runner without a gateway says nothing

    expected = [("hospital-a", SPARQL_SUMMARY), ("hospital-b", None)]
    for answer in (client.get(f"/api/tasks/{task_id}", headers=alice).json,
                   client.get(f"/api/tasks/{task_id}", query_string={"wait_seconds": 30}, headers=alice).json,
                   client.get("/api/tasks", headers=alice).json["items"][0],
                   client.post(f"/api/tasks/{task_id}/cancel", headers=alice).json):
        assert [(run["site"], run["sparql"]) for run in answer["runs"]] == expected


def test_the_largest_counts_the_database_holds_are_stored_exactly(client, alice, hospital):
    post_task(client, alice)
    largest = {"queries": 2 ** 63 - 1, "bytes": 2 ** 63 - 1, "refused": 2 ** 63 - 1}
    assert finish(client, hospital, claim(client, hospital).json, sparql=largest).status_code == 200
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["sparql"] == largest


@pytest.mark.parametrize("sparql, complaint", [
    ({**SPARQL_SUMMARY, "rows": 5}, "rows"),             # unknown keys, as everywhere
    ({"queries": 1, "bytes": 2}, "refused"),
    ({**SPARQL_SUMMARY, "bytes": -1}, "bytes"),
    ({**SPARQL_SUMMARY, "queries": 2 ** 63}, "queries"),  # beyond the database's BigInteger
    ({**SPARQL_SUMMARY, "queries": 2.5}, "queries"),      # refused, not cut down to 2
    ({**SPARQL_SUMMARY, "refused": True}, "refused"),
    ([12, 3_400_000, 1], "sparql"),
])
def test_a_bad_sparql_summary_is_rejected_and_the_run_stays_open(client, alice, hospital, sparql, complaint):
    post_task(client, alice)
    run = claim(client, hospital).json
    response = finish(client, hospital, run, sparql=sparql)
    assert response.status_code == 422
    assert complaint in response.get_data(as_text=True)
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["status"] == "running"


def test_a_whole_number_spelled_as_a_float_is_that_number(client, alice, hospital):
    post_task(client, alice)
    assert finish(client, hospital, claim(client, hospital).json, sparql={**SPARQL_SUMMARY, "queries": 12.0}).json == {
        "status": "completed"}
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["sparql"] == SPARQL_SUMMARY


def test_the_sparql_summary_is_part_of_the_finish_report(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert finish(client, hospital, run, sparql=SPARQL_SUMMARY).status_code == 200
    assert finish(client, hospital, run, sparql=dict(reversed(SPARQL_SUMMARY.items()))).status_code == 200  # the same
    assert finish(client, hospital, run, sparql={**SPARQL_SUMMARY, "queries": 13}).status_code == 409
    assert finish(client, hospital, run).status_code == 409  # no summary after one is another report too
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["sparql"] == SPARQL_SUMMARY

    post_task(client, alice)
    unreported = claim(client, hospital).json
    assert finish(client, hospital, unreported).status_code == 200
    assert finish(client, hospital, unreported, sparql=None).status_code == 200  # null is the same as leaving it out
    assert finish(client, hospital, unreported, sparql=SPARQL_SUMMARY).status_code == 409


def test_a_site_learns_which_site_its_token_is(app, client, alice, make_site):
    hospital_a, hospital_b = make_site("hospital-a"), make_site("hospital-b")
    me_a = client.get("/api/site/me", headers=hospital_a).json
    me_b = client.get("/api/site/me", headers=hospital_b).json
    assert (me_a["name"], me_b["name"]) == ("hospital-a", "hospital-b") and me_a["id"] != me_b["id"]
    assert me_a == {"id": me_a["id"], "name": "hospital-a"}
    assert client.get("/api/site/me", headers=alice).status_code == 403
    assert client.get("/api/site/me", headers={"Authorization": "Bearer pht_unknown"}).status_code == 401
    store.revoke_principal(app.extensions["pht"].engine, store.SITE, "hospital-b")
    assert client.get("/api/site/me", headers=hospital_b).status_code == 401


def test_upload_with_wrong_checksum_is_rejected_and_not_stored(app, client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    response = upload(client, hospital, run, "output", b"payload", sha256="0" * 64)
    assert response.status_code == 400
    assert "sha256" in response.json["message"]
    blobs_root = app.extensions["pht"].blobs.root
    assert [p for p in blobs_root.rglob("*") if p.is_file()] == []
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["output_sha256"] is None


def test_a_site_sees_only_its_own_runs(client, alice, hospital, make_site):
    other = make_site("hospital-b")
    post_task(client, alice)
    run = claim(client, hospital).json
    assert client.get(f"/api/site/runs/{run['id']}/input", headers=other).status_code == 404
    forged = {**run}
    assert finish(client, other, forged).status_code == 404


def test_refused_run_records_the_reason(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    response = client.post(f"/api/site/runs/{run['id']}/refuse", headers=hospital,
                           json={"lease_id": run["lease_id"], "reason": "not on the whitelist"})
    assert response.status_code == 204
    stored = client.get("/api/tasks/1", headers=alice).json["runs"][0]
    assert (stored["status"], stored["reason"]) == ("refused", "not on the whitelist")


def test_cancel_reaches_pending_and_running_runs(client, alice, make_site):
    site_a, site_b = make_site("hospital-a"), make_site("hospital-b")
    post_task(client, alice, sites=["hospital-a", "hospital-b"])
    run = claim(client, site_a).json
    cancelled = client.post("/api/tasks/1/cancel", headers=alice).json
    assert [r["status"] for r in cancelled["runs"]] == ["cancelled", "cancelled"]
    beat = client.post(f"/api/site/runs/{run['id']}/heartbeat", headers=site_a, json={"lease_id": run["lease_id"]})
    assert beat.json == {"status": "cancelled"}
    assert claim(client, site_b).status_code == 204


def test_expired_lease_returns_the_run_to_the_queue(app, client, alice, hospital):
    post_task(client, alice)
    first = claim(client, hospital).json
    expire_leases(app)
    second = claim(client, hospital).json
    assert second["id"] == first["id"] and second["lease_id"] != first["lease_id"]
    # The runner that lost the lease may no longer report.
    assert finish(client, hospital, first).status_code == 409
    history = [e["status"] for e in client.get(f"/api/runs/{first['id']}/history", headers=alice).json]
    assert history == ["pending", "claimed", "expired", "pending", "claimed"]


def test_run_fails_after_too_many_expired_leases(app, client, alice, hospital):
    post_task(client, alice)
    for _ in range(3):
        assert claim(client, hospital).status_code == 200
        expire_leases(app)
    assert claim(client, hospital).status_code == 204
    run = client.get("/api/tasks/1", headers=alice).json["runs"][0]
    assert run["status"] == "failed" and "lease ran out 3 times" in run["reason"]


def expire_leases(app):
    """Every lease runs out, and the registry's lease sweeper comes by."""
    engine = app.extensions["pht"].engine
    with engine.begin() as conn:
        conn.execute(store.runs.update().values(lease_expires_at=time.time() - 1))
    app.extensions["pht"].expire_lapsed_leases()


def test_long_poll_wakes_when_a_task_is_posted(app, alice, hospital):
    claimed = {}

    def wait_for_run():
        started = time.monotonic()
        response = app.test_client().post("/api/site/claim", json={"wait_seconds": 20}, headers=hospital)
        claimed["status"], claimed["after"] = response.status_code, time.monotonic() - started

    waiter = threading.Thread(target=wait_for_run)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # it is waiting, not answering "nothing yet"
    post_task(app.test_client(), alice)
    waiter.join(timeout=10)
    assert claimed["status"] == 200
    assert claimed["after"] < 10  # woken by the post, not by the 20 s timeout


def test_researcher_long_poll_answers_when_the_task_ends(app, alice, hospital):
    client = app.test_client()
    post_task(client, alice)
    run = claim(client, hospital).json
    answered = {}

    def wait_for_task():
        started = time.monotonic()
        task = app.test_client().get("/api/tasks/1", query_string={"wait_seconds": 30}, headers=alice).json
        answered["status"], answered["after"] = task["status"], time.monotonic() - started

    waiter = threading.Thread(target=wait_for_task)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    finish(client, hospital, run)
    waiter.join(timeout=10)
    assert answered["status"] == "completed" and answered["after"] < 10
    # An ended task answers at once, whatever the wait.
    assert client.get("/api/tasks/1", query_string={"wait_seconds": 30}, headers=alice).json["status"] == "completed"


def test_long_poll_answers_204_when_nothing_comes(client, hospital):
    assert claim(client, hospital, wait_seconds=1).status_code == 204


def test_sites_report_liveness_and_sparql_state(client, alice, hospital, make_site):
    make_site("hospital-b")
    client.post("/api/site/claim", json={"wait_seconds": 0, "sparql_ok": True, "runner_version": "t/1"},
                headers=hospital)
    sites = {s["name"]: s for s in client.get("/api/sites", headers=alice).json["items"]}
    assert sites["hospital-a"]["online"] is True and sites["hospital-a"]["sparql_ok"] is True
    assert sites["hospital-b"]["online"] is False


def test_tasks_list_by_session_and_status_one_page_at_a_time(client, alice, hospital, make_researcher):
    first = post_task(client, alice).json
    post_task(client, alice, session_id=first["session_id"])
    other_session = post_task(client, alice).json
    post_task(client, make_researcher("bob"))  # never visible to alice
    run = claim(client, hospital).json
    finish(client, hospital, run)

    def listed(**query):
        page = client.get("/api/tasks", query_string=query, headers=alice).json
        return [t["id"] for t in page["items"]], page["total"]

    assert listed() == ([1, 2, 3], 3)
    assert listed(session_id=first["session_id"]) == ([1, 2], 2)
    assert listed(status="completed") == ([1], 1)
    assert listed(status="active") == ([2, 3], 2)
    assert listed(per_page=2, page=2) == ([3], 3)
    assert listed(session_id=other_session["session_id"], status="completed") == ([], 0)
    assert client.get("/api/tasks", query_string={"status": "odd"}, headers=alice).status_code == 422
    assert client.get("/api/tasks", query_string={"per_page": 0}, headers=alice).status_code == 422


def test_openapi_document_describes_every_route(app, client):
    document = client.get("/openapi.json").json
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    for rule in app.url_map.iter_rules():
        # /docs and the dashboard (/ui/) are pages for people, not the REST API.
        if rule.endpoint in ("static", "openapi.spec", "openapi.docs") or rule.rule.startswith(("/docs", "/ui/")):
            continue
        path = rule.rule.replace("<int:", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, f"{method} {path} is not in the OpenAPI document"
    upload_body = document["paths"]["/api/site/runs/{run_id}/output"]["put"]["requestBody"]
    assert "application/octet-stream" in upload_body["content"]


def _operations(client):
    document = client.get("/openapi.json").json
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield re.sub(r"\{\w+\}", "1", path), method, operation


def test_every_endpoint_but_health_needs_a_token(client):
    for path, method, _ in _operations(client):
        status = client.open(path, method=method.upper()).status_code
        expected = 200 if path == "/health" else 401
        assert status == expected, f"{method.upper()} {path} answered {status} without a token"


def test_each_role_is_refused_the_other_roles_endpoints(client, alice, hospital):
    for path, method, operation in _operations(client):
        if path == "/health":
            continue
        wrong_role = alice if path.startswith("/api/site/") else hospital
        status = client.open(path, method=method.upper(), headers=wrong_role, json={}).status_code
        assert status == 403, f"{method.upper()} {path} answered {status} to the wrong role"


AGE_KEY = "age1" + "q" * 58


def test_encrypted_task_carries_the_researchers_keys_to_the_site(client, alice, hospital):
    assert post_task(client, alice, encrypt=True).status_code == 409  # no key registered yet
    added = client.post("/api/keys", json={"public_key": AGE_KEY}, headers=alice)
    assert added.status_code == 201 and added.json["public_key"] == AGE_KEY
    task = post_task(client, alice, encrypt=True).json
    assert task["encrypted_to"] == [AGE_KEY]
    assert claim(client, hospital).json["recipients"] == [AGE_KEY]

    client.delete(f"/api/keys/{added.json['id']}", headers=alice)
    assert client.get("/api/keys", headers=alice).json == []
    assert client.get(f"/api/tasks/{task['id']}", headers=alice).json["encrypted_to"] == [AGE_KEY]  # kept


def test_plain_task_has_no_recipients(client, alice, hospital):
    client.post("/api/keys", json={"public_key": AGE_KEY}, headers=alice)
    post_task(client, alice)
    assert claim(client, hospital).json["recipients"] == []


def test_bad_public_key_is_rejected(client, alice):
    response = client.post("/api/keys", json={"public_key": "ssh-rsa AAAA"}, headers=alice)
    assert response.status_code == 422 and "age public key" in response.get_data(as_text=True)


def test_delivery_receipts_are_recorded_once(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    receipt = {"lease_id": run["lease_id"], "recipient": "ttp", "name": "keys.csv", "size": 120, "sha256": "a" * 64}
    deliver = lambda body: client.post(f"/api/site/runs/{run['id']}/deliveries", json=body, headers=hospital)
    assert deliver(receipt).status_code == 204
    assert deliver(receipt).status_code == 204  # the same receipt again
    assert deliver({**receipt, "sha256": "b" * 64}).status_code == 409
    stored = client.get("/api/tasks/1", headers=alice).json["runs"][0]["deliveries"]
    assert [(d["recipient"], d["name"], d["size"], d["sha256"]) for d in stored] == [("ttp", "keys.csv", 120, "a" * 64)]


# --- runs parked at their site while a person there decides ---------------------------------------------

DIGEST = "sha256:" + "ab" * 32


def park(client, site, run, status="awaiting_approval", reason="waits for the IT officer", **more):
    return client.post(f"/api/site/runs/{run['id']}/park", headers=site,
                       json={"lease_id": run["lease_id"], "status": status, "reason": reason, **more})


def resume(client, site, run):
    return client.post(f"/api/site/runs/{run['id']}/resume", headers=site, json={"lease_id": run["lease_id"]})


def test_a_run_awaiting_approval_keeps_its_lease_and_attempts_until_the_site_goes_on(app, client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital).json
    assert park(client, hospital, run, image_digest=DIGEST).status_code == 204
    assert park(client, hospital, run, image_digest=DIGEST).status_code == 204  # a restarted runner asks again
    waiting = client.get("/api/tasks/1", headers=alice).json
    assert waiting["status"] == "active"
    assert {key: waiting["runs"][0][key] for key in ("status", "reason", "image_digest", "attempts")} == {
        "status": "awaiting_approval", "reason": "waits for the IT officer", "image_digest": DIGEST, "attempts": 1}
    expire_leases(app)
    assert claim(client, hospital).status_code == 204  # the sweeper left this one alone: it waits, not lapsed
    beat = client.post(f"/api/site/runs/{run['id']}/heartbeat", headers=hospital, json={"lease_id": run["lease_id"]})
    assert beat.json == {"status": "awaiting_approval"}

    assert resume(client, hospital, run).json == {"status": "claimed", "lease_seconds": 30}
    assert resume(client, hospital, run).json == {"status": "claimed", "lease_seconds": 30}  # and again
    assert start(client, hospital, run).status_code == 204
    assert park(client, hospital, run, status="held_for_review", reason="held for review").status_code == 204
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["status"] == "held_for_review"
    assert resume(client, hospital, run).json["status"] == "running"
    assert finish(client, hospital, run).status_code == 200
    done = client.get("/api/tasks/1", headers=alice).json["runs"][0]
    assert (done["status"], done["reason"], done["attempts"]) == ("completed", None, 1)
    history = [e["status"] for e in client.get(f"/api/runs/{run['id']}/history", headers=alice).json]
    assert history == ["pending", "claimed", "awaiting_approval", "claimed", "running", "held_for_review",
                       "running", "completed"]


def test_a_denied_run_is_refused_and_a_cancelled_one_cannot_go_on(client, alice, hospital):
    post_task(client, alice)
    post_task(client, alice)
    denied, cancelled = claim(client, hospital).json, claim(client, hospital).json
    for run in (denied, cancelled):
        assert park(client, hospital, run, image_digest=DIGEST).status_code == 204
    refused = client.post(f"/api/site/runs/{denied['id']}/refuse", headers=hospital,
                          json={"lease_id": denied["lease_id"], "reason": "denied by the site's IT officer: no"})
    assert refused.status_code == 204
    assert client.get("/api/tasks/1", headers=alice).json["runs"][0]["reason"] == "denied by the site's IT officer: no"
    client.post("/api/tasks/2/cancel", headers=alice)
    beat = client.post(f"/api/site/runs/{cancelled['id']}/heartbeat", headers=hospital,
                       json={"lease_id": cancelled["lease_id"]})
    assert beat.json == {"status": "cancelled"}
    assert resume(client, hospital, cancelled).status_code == 409


@pytest.mark.parametrize("moves, refused_move, message", [
    ([], ("park", "held_for_review"), "no longer leased"),              # results held before it ran
    ([("park", "awaiting_approval")], ("park", "held_for_review"), "no longer leased"),
    ([("start", None)], ("park", "awaiting_approval"), "no longer leased"),  # approval after it started
    ([("park", "awaiting_approval")], ("start", None), "no longer leased"),  # it must be resumed first
    ([], ("finish", None), "a run that is claimed cannot become completed"),  # completed without running
])
def test_moves_the_lifecycle_does_not_allow_answer_409(client, alice, hospital, moves, refused_move, message):
    post_task(client, alice)
    run = claim(client, hospital).json

    def move(what, status):
        if what == "park":
            return park(client, hospital, run, status=status, image_digest=DIGEST)
        if what == "start":
            return start(client, hospital, run)
        if what == "resume":
            return resume(client, hospital, run)
        return client.post(f"/api/site/runs/{run['id']}/finish", headers=hospital,
                           json={"lease_id": run["lease_id"], "exit_code": 0})

    for made in moves:
        assert move(*made).status_code < 300
    answer = move(*refused_move)
    assert answer.status_code == 409
    assert message in answer.json["message"]


@pytest.mark.parametrize("body, complaint", [
    ({"status": "running", "reason": "x"}, "Must be one of"),
    ({"status": "awaiting_approval", "reason": ""}, "Length must be between 1 and 2000"),
    ({"status": "awaiting_approval"}, "Missing data"),
    ({"status": "awaiting_approval", "reason": "x", "image_digest": "d" * 300}, "must be an image digest"),
    ({"status": "awaiting_approval", "reason": "x", "image_digest": "sha256:" + "d" * 64 + "\n"}, "must be an image digest"),
])
def test_a_bad_park_is_a_422_naming_the_field(client, alice, hospital, body, complaint):
    post_task(client, alice)
    run = claim(client, hospital).json
    answer = client.post(f"/api/site/runs/{run['id']}/park", headers=hospital, json={"lease_id": run["lease_id"], **body})
    assert answer.status_code == 422
    assert complaint in answer.get_data(as_text=True)
