"""Attacks on API 1.6's claims that start a run (start_pinned): an attacker's review, and what it found.

Registry side through Flask's test client (fast); the runner's registry client against tests/fake_registry.py
(no Docker).
"""

import hashlib

import pytest

from client.claim import InvalidClaim
from client.registry_client import RegistryClient, RegistryRefused
from common import names
from master import store
from tests.fake_registry import Answer, FakeRegistry
from tests.test_registry_api import alice, expire_leases, hospital  # noqa: F401 (fixtures)

IMAGE = "127.0.0.1:5050/pht/patient-count:latest"
DIGEST = "sha256:" + "c" * 64
PINNED = IMAGE + "@" + DIGEST
SITE_DIGEST = "sha256:" + "d" * 64  # what a site reports it ran


def post_task(client, researcher, image=PINNED, sites=("hospital-a",)):
    response = client.post("/api/tasks", headers=researcher,
                           json={"image": image, "input": "{}", "sites": list(sites)})
    assert response.status_code == 201, response.json
    return response.json


def claim(client, site, start_pinned=None):
    body = {"wait_seconds": 0} if start_pinned is None else {"wait_seconds": 0, "start_pinned": start_pinned}
    return client.post("/api/site/claim", json=body, headers=site)


def site_call(client, site, run, what, **body):
    return client.post(f"/api/site/runs/{run['id']}/{what}", headers=site, json={"lease_id": run["lease_id"], **body})


def refuse(client, site, run, reason="not on this site's whitelist"):
    return site_call(client, site, run, "refuse", reason=reason)


def upload(client, site, run, kind, body):
    return client.put(f"/api/site/runs/{run['id']}/{kind}", data=body, headers={
        **site, "X-Lease-Id": run["lease_id"], "X-Content-SHA256": hashlib.sha256(body).hexdigest(),
        "Content-Type": "application/octet-stream"})


def listed(client, researcher, run):
    [found] = [r for r in client.get(f"/api/tasks/{run['task_id']}", headers=researcher).json["runs"]
               if r["id"] == run["id"]]
    return found


def history(client, researcher, run):
    return [event["status"] for event in client.get(f"/api/runs/{run['id']}/history", headers=researcher).json]


# --- defects: a run that ran can be refused, and so hidden ---------------------------------------------------


def test_a_run_the_site_reported_started_cannot_be_refused_after_its_results_arrived(client, alice, hospital):
    """RUNNING -> REFUSED is meant for a run its claim started, before its container starts. The registry allows it
    for any running run: a site reports the start (with the digest it ran), uploads the output, then refuses; the
    run shows as refused, its digest erased, while its output stays downloadable."""
    post_task(client, alice)
    run = claim(client, hospital).json  # not asked to start: the site reports the start itself
    assert run["started"] is False
    assert site_call(client, hospital, run, "start", image_digest=SITE_DIGEST).status_code == 204
    assert upload(client, hospital, run, "output", b"what the algorithm wrote").status_code == 200
    answer = refuse(client, hospital, run)
    shown = listed(client, alice, run)
    output = client.get(f"/api/runs/{run['id']}/output", headers=alice)
    assert answer.status_code == 409, (
        f"a run that reported its start and uploaded its output was refused: it shows as {shown['status']}, "
        f"image_digest {shown['image_digest']} (was {SITE_DIGEST}), its output downloadable: {output.status_code}")
    assert (shown["status"], shown["image_digest"]) == ("running", SITE_DIGEST)


def test_a_run_its_claim_started_cannot_be_refused_once_it_ran(client, alice, hospital):
    """A run its claim started may be refused "before its container starts" (master/lifecycle.py); one whose
    container ran (its log is at the registry) is refused all the same, and keeps no digest."""
    post_task(client, alice)
    run = claim(client, hospital, start_pinned=True).json
    assert run["started"] is True
    assert upload(client, hospital, run, "log", b"the algorithm ran\n").status_code == 200
    answer = refuse(client, hospital, run)
    assert answer.status_code == 409, (
        f"a run with a log was refused: {listed(client, alice, run)['status']}, "
        f"image_digest {listed(client, alice, run)['image_digest']}")


def test_a_run_released_from_review_cannot_be_refused(client, alice, hospital):
    """A run held for review ran; once its output is released (running again) the site can refuse it, and the
    history reads ... held_for_review, running, refused, with no digest."""
    post_task(client, alice)
    run = claim(client, hospital, start_pinned=True).json
    assert site_call(client, hospital, run, "park", status="held_for_review",
                     reason="held for review").status_code == 204
    assert site_call(client, hospital, run, "resume").json["status"] == "running"
    answer = refuse(client, hospital, run)
    assert answer.status_code == 409, f"a run released from review was refused: {history(client, alice, run)}"


def test_a_refused_run_that_its_claim_started_before_keeps_no_digest(app, client, alice, hospital):
    """"Such a run can still be refused (then it keeps no digest)": not when its lease ran out first. The started
    run goes back to pending with the digest the claim recorded; claimed again without start_pinned (the site's
    policy changed) and refused from claimed, it ends refused with that digest, an image it never ran."""
    post_task(client, alice)
    first = claim(client, hospital, start_pinned=True).json
    assert first["started"] is True
    expire_leases(app)
    again = claim(client, hospital).json
    assert (again["id"], again["started"]) == (first["id"], False)
    assert refuse(client, hospital, again).status_code == 204
    shown = listed(client, alice, again)
    assert (shown["status"], shown["image_digest"]) == ("refused", None), shown


# --- what held (fast regression tests) ------------------------------------------------------------------------


def test_a_started_run_is_the_sites_own_pinned_run_with_the_tasks_digest(client, alice, make_site):
    """start_pinned starts only the claiming site's own run, only of a pinned image, with the task's digest; an
    unpinned task's run is only claimed."""
    a, b = make_site("hospital-a"), make_site("hospital-b")
    post_task(client, alice, sites=["hospital-b"])
    assert claim(client, a, start_pinned=True).status_code == 204, "a site claimed another site's run"
    post_task(client, alice, image=IMAGE, sites=["hospital-a"])
    unpinned = claim(client, a, start_pinned=True).json
    assert unpinned["started"] is False and listed(client, alice, unpinned)["status"] == "claimed"
    assert listed(client, alice, unpinned)["image_digest"] is None
    other = claim(client, b, start_pinned=True).json
    assert other["started"] is True
    assert (listed(client, alice, other)["status"], listed(client, alice, other)["image_digest"]) == ("running", DIGEST)
    # Another site cannot touch it with its lease id.
    assert refuse(client, a, other).status_code == 404


def test_a_started_run_is_not_started_or_parked_for_approval_again(client, alice, hospital):
    post_task(client, alice)
    run = claim(client, hospital, start_pinned=True).json
    assert site_call(client, hospital, run, "start", image_digest=SITE_DIGEST).status_code == 409
    assert site_call(client, hospital, run, "park", status="awaiting_approval", reason="x",
                     image_digest=SITE_DIGEST).status_code == 409
    assert listed(client, alice, run)["image_digest"] == DIGEST, "a site changed the digest a claim recorded"


def test_neither_refused_nor_finished_runs_move_again(client, alice, hospital):
    post_task(client, alice)
    post_task(client, alice)
    refused = claim(client, hospital, start_pinned=True).json
    assert refuse(client, hospital, refused).status_code == 204
    assert site_call(client, hospital, refused, "start", image_digest=SITE_DIGEST).status_code == 409
    assert site_call(client, hospital, refused, "finish", exit_code=0).status_code == 409
    assert listed(client, alice, refused)["status"] == "refused"
    finished = claim(client, hospital, start_pinned=True).json
    assert site_call(client, hospital, finished, "finish", exit_code=0).status_code == 200
    assert refuse(client, hospital, finished).status_code == 409, "a finished run was refused"
    assert listed(client, alice, finished)["status"] == "completed"


def test_a_cancelled_or_revoked_run_is_not_started_by_a_claim(app, client, alice, hospital):
    task = post_task(client, alice)
    assert client.post(f"/api/tasks/{task['id']}/cancel", headers=alice).status_code == 200
    assert claim(client, hospital, start_pinned=True).status_code == 204
    post_task(client, alice)
    run = claim(client, hospital, start_pinned=True).json
    assert client.post(f"/api/tasks/{run['task_id']}/cancel", headers=alice).status_code == 200
    assert site_call(client, hospital, run, "heartbeat").json["status"] == "cancelled"
    assert refuse(client, hospital, run).status_code == 409, "a cancelled run was refused"
    assert listed(client, alice, run)["status"] == "cancelled"
    post_task(client, alice)
    started = claim(client, hospital, start_pinned=True).json
    store.revoke_principal(app.extensions["pht"].engine, store.SITE, "hospital-a")
    assert listed(client, alice, started)["status"] == "failed"


@pytest.mark.parametrize("value", [None, [], {}, "maybe", 2, {"a": 1}])
def test_a_claim_with_an_odd_start_pinned_is_refused_not_a_server_error(client, alice, hospital, value):
    post_task(client, alice)
    answer = client.post("/api/site/claim", json={"wait_seconds": 0, "start_pinned": value}, headers=hospital)
    assert answer.status_code == 422, (answer.status_code, answer.json)
    assert listed(client, alice, {"id": 1, "task_id": 1})["status"] == "pending"


@pytest.mark.parametrize("reference, digest", [
    ("x@" + DIGEST, DIGEST),
    ("registry.example:5000/a/b:tag@" + DIGEST, DIGEST),
    ("x@" + DIGEST + "\n", None),
    ("x@sha256:" + "C" * 64, None),
    ("x@sha256:" + "c" * 63, None),
    ("x@sha512:" + "c" * 64, None),
    ("x:sha256", None),
    ("x@" + DIGEST + "@" + DIGEST, DIGEST),  # not a reference the registry takes at all (see below)
])
def test_pinned_digest(reference, digest):
    assert names.pinned_digest(reference) == digest


def test_no_task_names_an_image_pinned_twice_or_oddly(client, alice, hospital):
    for image in ("x@" + DIGEST + "@" + DIGEST, "x@" + DIGEST + "\n", "x@sha256:" + "C" * 64):
        answer = client.post("/api/tasks", headers=alice, json={"image": image, "input": "{}", "sites": ["hospital-a"]})
        assert answer.status_code == 422, image


# --- the runner's registry client -----------------------------------------------------------------------------

START_ANSWER = {"id": 7, "task_id": 5, "session_id": 3, "image": PINNED, "lease_id": "lease", "lease_seconds": 60}
OLD_REGISTRYS_REFUSAL = Answer.json({"message": "Validation error",
                                     "detail": {"json": {"start_pinned": ["Unknown field."]}}}, status=422)


@pytest.fixture
def fake():
    registry = FakeRegistry("hospital-a")
    yield registry
    registry.stop()


def test_the_client_asks_only_after_an_answer_said_started_and_forgets_when_one_does_not(fake):
    client = RegistryClient(fake.url, "pht_token", retry_for_seconds=5)
    fake.offer_claim(START_ANSWER)  # an older registry: no "started"
    assert client.claim_run(0, True, start_pinned=True).started is None
    fake.offer_claim({**START_ANSWER, "started": False})
    client.claim_run(0, True, start_pinned=True)
    fake.offer_claim({**START_ANSWER, "started": "yes"})  # garbage: the claim is invalid, nothing learned from it
    with pytest.raises(InvalidClaim):
        client.claim_run(0, True, start_pinned=True)
    fake.offer_claim(START_ANSWER)  # the registry was replaced by an older one
    client.claim_run(0, True, start_pinned=True)
    assert client.claim_run(0, True, start_pinned=False) is None  # the policy changed: never asked
    asked = [body.get("start_pinned") for body in fake.bodies("claim")]
    assert asked == [None, None, True, True, None]


def test_a_registry_rolled_back_to_before_api_1_6_is_not_refused_for_ever(fake):
    """Once a claim answer carried "started", every claim asks start_pinned, until a claim is answered again. An
    older registry (a rollback; a replica not yet upgraded behind a balancer) refuses every such claim with 422,
    so no claim is answered and the runner asks the same way again, every poll interval, for ever: it takes no
    more work until it is restarted."""
    client = RegistryClient(fake.url, "pht_token", retry_for_seconds=5)
    fake.offer_claim({**START_ANSWER, "started": False})
    client.claim_run(0, True, start_pinned=True)
    for _ in range(3):
        fake.offer_claim(OLD_REGISTRYS_REFUSAL)
        try:
            client.claim_run(0, True, start_pinned=True)
        except RegistryRefused:
            pass
    asked = [body.get("start_pinned") for body in fake.bodies("claim")]
    assert asked[-1] is None, (f"claims after a 422 to start_pinned still ask it: {asked}; a runner against an "
                               "older registry never claims again")
