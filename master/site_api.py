"""What site runners do: claim runs (long-poll), heartbeat, report, upload results.

A site sees only runs assigned to it and may report only on runs it holds the
lease for; every request below /api/site/ needs a site token.
"""

import base64
import logging
import time

from apiflask import APIBlueprint, Schema, abort
from apiflask.fields import String
from apiflask.validators import Length
from flask import Response, current_app, request

from common.names import MAX_INLINE_BYTES
from master import auth, blobs, lifecycle, store, wakeup
from master.schemas import (BlobStoredOut, ClaimedRunOut, ClaimIn, ClosedSessionIdsOut, DeliveryIn, FinishIn,
                            HeartbeatOut, LeaseIn, ParkIn, RefuseIn, ResumedOut, SessionIdsIn, Sha256, SiteIdentityOut,
                            StartIn)

log = logging.getLogger("pht.registry")

bp = APIBlueprint("sites", __name__, url_prefix="/api/site", tag="Sites")



def _registry():
    return current_app.extensions["pht"]


class UploadHeaders(Schema):
    lease_id = String(required=True, data_key="X-Lease-Id", validate=Length(1, 64))
    sha256 = Sha256(required=True, data_key="X-Content-SHA256")


@bp.get("/me")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.output(SiteIdentityOut)
def who_am_i():
    """The calling site's id and name, for a runner to check at start that its token is its own.

    An unknown or revoked token answers 401, as everywhere; a researcher's token 403."""
    site = auth.caller()
    return {"id": site.id, "name": site.name}


@bp.post("/claim")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(ClaimIn)
@bp.output(ClaimedRunOut)
@bp.doc(responses={204: "No run became available within wait_seconds."})
def claim_run(json_data):
    """Claim the site's next pending run, waiting up to wait_seconds for one (long-poll)."""
    registry = _registry()
    site = auth.caller()
    registry.saw_site(site.id, json_data.get("runner_version"), json_data.get("sparql_ok"))
    deadline = time.monotonic() + json_data["wait_seconds"]
    news = False
    while True:
        seen = registry.work_for_sites.generation(site.id)
        run = store.claim_next_run(registry.engine, site.id, registry.settings.lease_seconds, look_first=not news,
                                   start_pinned=json_data["start_pinned"])
        if run is not None:
            log.info("run %s (task %s) claimed by site %s%s", run["id"], run["task_id"], site.name,
                     ", and started" if run["started"] else "")
            inline = run.pop("input")
            if inline is not None:
                run["input_base64"] = base64.b64encode(inline).decode()
            return {**run, "lease_seconds": registry.settings.lease_seconds, "inline_result_bytes": MAX_INLINE_BYTES}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _nothing_claimed()
        # A parked claim costs nothing until news for its site: every change that gives a site a run is announced
        # (posting a task, the lease sweeper), here or by another replica through PostgreSQL. Only while that
        # relay is deaf does the claim look in the database again, as a safety net. A wait that heard nothing
        # answers without looking again: nothing can have become the site's; one that heard news goes straight to
        # the lease.
        if registry.hears_every_announcement():
            news = registry.work_for_sites.wait_for_news(site.id, seen, remaining)
            if not news:
                return _nothing_claimed()
        else:
            news = registry.work_for_sites.wait_for_news(site.id, seen, min(remaining, wakeup.RECHECK_SECONDS))


def _nothing_claimed():
    # A Response, which apiflask sends as it is: "" would first go through the claimed run's schema.
    return Response(status=204)


@bp.post("/sessions/closed")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(SessionIdsIn)
@bp.output(ClosedSessionIdsOut)
def closed_sessions(json_data):
    """Which of the given sessions are closed or do not exist: the site may remove its /temp folders of those."""
    return {"closed": store.closed_sessions(_registry().engine, json_data["session_ids"])}


@bp.get("/runs/<int:run_id>/input")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.doc(responses={200: {"description": "The task's configuration file, byte-exact.",
                         "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                   404: "No such run at this site."})
def get_run_input(run_id):
    """The configuration file of the task this run belongs to."""
    engine = _registry().engine
    run = store.get_site_run(engine, run_id, auth.caller().id)
    return store.get_task_input(engine, run["task_id"]), 200, {"Content-Type": "application/octet-stream"}


@bp.post("/runs/<int:run_id>/start")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(StartIn)
@bp.output({}, status_code=204)
@bp.doc(responses=[404, 409])
def start_run(run_id, json_data):
    """The image is pulled and the container starts; records the digest that runs."""
    store.mark_run_started(_registry().engine, run_id, auth.caller().id, json_data["lease_id"],
                           json_data["image_digest"])
    log.info("run %s running image %s", run_id, json_data["image_digest"])
    return ""


@bp.post("/runs/<int:run_id>/heartbeat")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(LeaseIn)
@bp.output(HeartbeatOut)
@bp.doc(responses=[404, 409])
def heartbeat(run_id, json_data):
    """Extend the lease on a run; the answer says whether it was cancelled meanwhile."""
    registry = _registry()
    status = store.extend_lease(registry.engine, run_id, auth.caller().id, json_data["lease_id"],
                                registry.settings.lease_seconds)
    return {"status": status}


@bp.post("/runs/<int:run_id>/park")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(ParkIn)
@bp.output({}, status_code=204)
@bp.doc(responses=[404, 409])
def park_run(run_id, json_data):
    """A person at the site decides before the run goes on: it awaits approval (from claimed) or is held for review
    (from running). The site keeps its lease, which does not run out meanwhile; the researcher sees the reason."""
    registry = _registry()
    task_id = store.park_run(registry.engine, run_id, auth.caller().id, json_data["lease_id"], json_data["status"],
                             json_data["reason"], json_data.get("image_digest"))
    registry.ended_tasks.announce([task_id])  # a researcher waiting for the task sees it wait
    log.info("run %s %s at site %s: %s", run_id, json_data["status"], auth.caller().name, json_data["reason"])
    return ""


@bp.post("/runs/<int:run_id>/resume")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(LeaseIn)
@bp.output(ResumedOut)
@bp.doc(responses=[404, 409])
def resume_run(run_id, json_data):
    """The site goes on with a parked run (approved, or its output released); the lease runs again."""
    registry = _registry()
    status = store.resume_run(registry.engine, run_id, auth.caller().id, json_data["lease_id"],
                              registry.settings.lease_seconds)
    log.info("run %s resumed by site %s: %s", run_id, auth.caller().name, status)
    return {"status": status, "lease_seconds": registry.settings.lease_seconds}


@bp.post("/runs/<int:run_id>/refuse")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(RefuseIn)
@bp.output({}, status_code=204)
@bp.doc(responses=[404, 409])
def refuse_run(run_id, json_data):
    """The site will not run this task (e.g. its image is not on the whitelist, or its IT officer denied it)."""
    registry = _registry()
    task_id = store.refuse_run(registry.engine, run_id, auth.caller().id, json_data["lease_id"], json_data["reason"])
    registry.ended_tasks.announce([task_id])
    log.info("run %s refused by site %s: %s", run_id, auth.caller().name, json_data["reason"])
    return ""


def _receive_blob(run_id, kind, headers_data):
    registry = _registry()
    site = auth.caller()
    # Fail before reading the body when the run is not this runner's to report on.
    run = store.get_site_run(registry.engine, run_id, site.id)
    if not _result_is_new(run, kind, headers_data["lease_id"], headers_data["sha256"]):
        return {"sha256": run[f"{kind}_sha256"], "size": run[f"{kind}_size"]}  # the same upload again
    limit = registry.settings.max_result_bytes
    request.max_content_length = limit
    try:
        size = registry.blobs.store_stream(request.stream, headers_data["sha256"], limit)
    except blobs.TooLarge as error:
        abort(413, str(error))
    except blobs.ChecksumMismatch as error:
        abort(400, str(error))
    except blobs.StoreUnreachable as error:
        log.error("run %s %s not stored: %s", run_id, kind, error)
        abort(503, "the registry's result store does not answer; upload again later")
    store.attach_blob(registry.engine, run_id, site.id, headers_data["lease_id"], kind, headers_data["sha256"], size)
    log.info("run %s %s stored: %d bytes, sha256 %s", run_id, kind, size, headers_data["sha256"])
    return {"sha256": headers_data["sha256"], "size": size}


def _result_is_new(run, kind, lease_id, sha256):
    """Whether the output or log (kind) of this sha256 is one the run (as the site may see it) still lacks: False
    when it has that very one. Aborts with 409 when the run is not leased to this runner, or takes no such result:
    decided before the result is stored, so that what could not be attached never is (a site sending other results
    after its run ended would otherwise fill the store with blobs nothing refers to)."""
    if run["lease_id"] != lease_id:
        abort(409, f"run {run['id']} is not leased to this runner")
    if run[f"{kind}_sha256"] == sha256:
        return False
    if run[f"{kind}_sha256"] is not None or run["status"] not in lifecycle.LEASED_STATES:
        abort(409, f"run {run['id']} already has a different {kind}" if run[f"{kind}_sha256"] else
              f"run {run['id']} is {run['status']}: it takes no {kind}")
    return True


_RAW_BODY = {"x-raw-body": {"application/octet-stream": "the file's bytes, streamed"}}


@bp.put("/runs/<int:run_id>/output")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(UploadHeaders, location="headers")
@bp.output(BlobStoredOut)
@bp.doc(responses=[400, 404, 409, 413], extensions=_RAW_BODY)
def upload_output(run_id, headers_data):
    """Upload the run's output folder as a gzipped tar archive (streamed; body checked against its sha256)."""
    return _receive_blob(run_id, "output", headers_data)


@bp.put("/runs/<int:run_id>/log")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(UploadHeaders, location="headers")
@bp.output(BlobStoredOut)
@bp.doc(responses=[400, 404, 409, 413], extensions=_RAW_BODY)
def upload_log(run_id, headers_data):
    """Upload the container's log (streamed; body checked against its sha256)."""
    return _receive_blob(run_id, "log", headers_data)


@bp.post("/runs/<int:run_id>/deliveries")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(DeliveryIn)
@bp.output({}, status_code=204)
@bp.doc(responses=[404, 409])
def record_delivery(run_id, json_data):
    """Receipt for a file the site sent straight to a recipient (e.g. a TTP's FileService)."""
    store.record_delivery(_registry().engine, run_id, auth.caller().id, json_data["lease_id"], json_data["recipient"],
                          json_data["name"], json_data["size"], json_data["sha256"])
    log.info("run %s delivered %s (%d bytes) to %s", run_id, json_data["name"], json_data["size"],
             json_data["recipient"])
    return ""


@bp.post("/runs/<int:run_id>/finish")
@bp.auth_required(auth.token_auth, roles=[auth.SITE])
@bp.input(FinishIn)
@bp.output(HeartbeatOut)
@bp.doc(responses=[404, 409])
def finish_run(run_id, json_data):
    """Report how the run ended, after its output and log are uploaded, or with them (when small).

    The same report again (exit code, failure reason, SPARQL summary and results alike) is fine; another answers
    409."""
    registry = _registry()
    carried = {kind: json_data[f"{kind}_base64"] for kind in ("output", "log")
               if json_data[f"{kind}_base64"] is not None}
    status, task_id = store.finish_run(registry.engine, run_id, auth.caller().id, json_data["lease_id"],
                                       json_data["exit_code"], json_data["failure_reason"], json_data["sparql"],
                                       carried)
    registry.ended_tasks.announce([task_id])
    log.info("run %s %s (exit code %s, SPARQL %s)%s", run_id, status, json_data["exit_code"], json_data["sparql"],
             "".join(f"; {kind} {len(data)} bytes carried" for kind, data in carried.items()))
    if status == lifecycle.FAILED and json_data["failure_reason"]:
        log.info("run %s failure reason: %s", run_id, json_data["failure_reason"])
    return {"status": status}
