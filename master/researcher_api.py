"""What researchers do: post tasks, follow their runs, fetch results, cancel, close sessions.

A researcher sees and changes only their own tasks; anything else answers 404,
so the API does not even reveal which task numbers exist.
"""

import base64
import logging
import time

from apiflask import APIBlueprint, abort
from flask import Response, current_app

from common.names import MAX_INLINE_BYTES
from master import auth, blobs, lifecycle, store, wakeup
from master.schemas import (ClosedSessionOut, PageIn, PublicKeyIn, PublicKeyOut, RunEventOut, SessionPageOut,
                            SitePageOut, TaskIn, TaskOut, TaskPageOut, TaskQueryIn, TaskWaitIn)

log = logging.getLogger("pht.registry")

bp = APIBlueprint("researchers", __name__, url_prefix="/api", tag="Researchers")


def _registry():
    return current_app.extensions["pht"]


@bp.post("/tasks")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(TaskIn)
@bp.output(TaskOut, status_code=201)
@bp.doc(responses={404: "An unknown site or session was named.",
                   409: "The session is closed, or an encrypted task was posted but the researcher has no "
                        "public key."})
def create_task(json_data):
    """Post a task: an image for the given sites to run, with its configuration file."""
    registry = _registry()
    if "input" in json_data:
        input_bytes = json_data["input"].encode("utf-8")
    else:
        input_bytes = base64.b64decode(json_data["input_base64"])
    if len(input_bytes) > registry.settings.max_input_bytes:
        abort(413, f"the input is {len(input_bytes)} bytes; the limit is {registry.settings.max_input_bytes}")
    researcher = auth.caller()
    task_id, site_ids = store.create_task(
        registry.engine, researcher.id, json_data["image"], input_bytes, json_data.get("sites"),
        session_id=json_data.get("session_id"), name=json_data.get("name"),
        description=json_data.get("description"), timeout_seconds=json_data.get("timeout_seconds"),
        encrypt=json_data["encrypt"])
    log.info("task %s created by researcher %s for %d site(s), image %s",
             task_id, researcher.name, len(site_ids), json_data["image"])
    registry.work_for_sites.announce(site_ids)
    return store.get_task(registry.engine, task_id, researcher.id)


@bp.get("/tasks")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(TaskQueryIn, location="query")
@bp.output(TaskPageOut)
def list_tasks(query_data):
    """The caller's tasks, oldest first; filter by session and status, one page at a time."""
    items, total = store.list_tasks(_registry().engine, auth.caller().id, **query_data)
    return {"items": items, "total": total, "page": query_data["page"], "per_page": query_data["per_page"]}


@bp.get("/tasks/<int:task_id>")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(TaskWaitIn, location="query")
@bp.output(TaskOut)
@bp.doc(responses=[404])
def get_task(task_id, query_data):
    """A task with the state of each of its runs; with wait_seconds, answers once the task has ended
    (or a run of it ended), or when wait_seconds have passed."""
    registry = _registry()
    task = _task_after_waiting(registry, task_id, auth.caller().id, query_data["wait_seconds"])
    if query_data["with_results"] and task["status"] != lifecycle.TaskStatus.ACTIVE:
        _carry_small_results(registry, task)
    return task


def _task_after_waiting(registry, task_id, researcher_id, wait_seconds):
    deadline = time.monotonic() + wait_seconds
    while True:
        seen = registry.ended_tasks.generation(task_id)
        task = store.get_task(registry.engine, task_id, researcher_id)
        remaining = deadline - time.monotonic()
        if task["status"] != lifecycle.TaskStatus.ACTIVE or remaining <= 0:
            return task
        # News of the task's runs comes from every replica (wakeup.PostgresRelay). An operator's revoke, in a
        # process of its own, announces nothing: the task is looked at again within wakeup.RECHECK_SECONDS.
        if registry.ended_tasks.wait_for_news(task_id, seen, min(remaining, wakeup.RECHECK_SECONDS)):
            return store.get_task(registry.engine, task_id, researcher_id)


# What an ended task's answer carries of its runs' results, in all (schemas.CARRIED_RESULT): a task to 200 sites
# whose outputs and logs are a few kilobytes each needs no download request each (docs/performance.md, section 12).
MAX_CARRIED_BYTES = 8 * 1024 * 1024


def _carry_small_results(registry, task):
    """Add each run's output and log of at most MAX_INLINE_BYTES to it, as bytes, while MAX_CARRIED_BYTES last.
    Those the database keeps (store.small_results) are read in one query; one the result store cannot give is
    left out: downloaded, it answers what is wrong."""
    room, chosen = MAX_CARRIED_BYTES, []
    for run in task["runs"]:
        for kind in ("output", "log"):
            sha256, size = run[f"{kind}_sha256"], run[f"{kind}_size"]
            if sha256 is not None and size <= min(MAX_INLINE_BYTES, room):
                chosen.append((run, kind))
                room -= size
    kept = store.small_results_of(registry.engine, {run[f"{kind}_sha256"] for run, kind in chosen})
    for run, kind in chosen:
        sha256, size = run[f"{kind}_sha256"], run[f"{kind}_size"]
        data = kept.get(sha256)
        if data is None:
            try:
                blob = registry.blobs.open(sha256, size)
                try:
                    data = blob.read(size + 1)
                finally:
                    blob.close()
            except Exception as error:  # whatever the store raises, also half-way (as _sent): not the task's 500
                log.error("the %s of run %s is not carried in its task: %s", kind, run["id"], error)
                continue
        if len(data) == size:
            run[f"{kind}_base64"] = data


@bp.post("/tasks/<int:task_id>/cancel")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.output(TaskOut)
@bp.doc(responses=[404])
def cancel_task(task_id):
    """Cancel a task: pending runs stop at once, running ones at their next heartbeat."""
    engine = _registry().engine
    cancelled = store.cancel_task(engine, task_id, auth.caller().id)
    _registry().ended_tasks.announce([task_id])
    log.info("task %s cancelled; runs %s", task_id, cancelled)
    return store.get_task(engine, task_id, auth.caller().id)


@bp.post("/sessions/<int:session_id>/close")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.output(ClosedSessionOut)
@bp.doc(responses={404: "No such session of the caller's.",
                   409: "A task of the session is still under way: cancel it or wait for it first."})
def close_session(session_id):
    """Close a session: it takes no more tasks, and each site removes its /temp folder of the session
    (the site learns it before its next claim). Closing a closed session again answers the same."""
    session = store.close_session(_registry().engine, session_id, auth.caller().id)
    log.info("session %s closed by researcher %s", session_id, auth.caller().name)
    return session


@bp.get("/sessions")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(PageIn, location="query")
@bp.output(SessionPageOut)
def list_sessions(query_data):
    """The caller's sessions, oldest first, with their task counts and whether they are closed."""
    items, total = store.list_sessions(_registry().engine, auth.caller().id, **query_data)
    return {"items": items, "total": total, **query_data}


@bp.get("/runs/<int:run_id>/history")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.output(RunEventOut(many=True))
@bp.doc(responses=[404])
def get_run_history(run_id):
    """Every state a run has been in, with its time."""
    engine = _registry().engine
    store.get_researcher_run(engine, run_id, auth.caller().id)
    return store.run_history(engine, run_id)


def send_blob(researcher_id, run_id, kind, mimetype, filename):
    """The run's output or log (kind), streamed, if the run is the researcher's; also the dashboard's download."""
    registry = _registry()
    run = store.get_researcher_run(registry.engine, run_id, researcher_id)
    sha256, size = run[f"{kind}_sha256"], run[f"{kind}_size"]
    if sha256 is None:
        abort(404, f"run {run_id} has no {kind} yet (it is {run['status']})")
    try:
        blob = registry.open_result(sha256, size)
    except blobs.BlobMissing as error:
        log.error("the %s of run %s cannot be sent: %s", kind, run_id, error)
        abort(500, f"the {kind} of run {run_id} is missing from the registry's result store; "
                   "the registry's operator finds why in its log")
    except blobs.StoreUnreachable as error:
        log.error("the %s of run %s cannot be sent: %s", kind, run_id, error)
        abort(503, "the registry's result store does not answer; try again later")
    response = Response(_sent(blob, f"the {kind} of run {run_id}"), mimetype=mimetype, direct_passthrough=True)
    response.content_length = size
    response.headers.set("Content-Disposition", "attachment", filename=filename)
    response.headers["X-Content-SHA256"] = sha256
    return response


def _sent(blob, what):
    """The blob's bytes, piece by piece, closed at the end. A store that fails once the answer's headers are
    out can only cut it short (the client sees fewer bytes than Content-Length): said once in the log."""
    try:
        while piece := blob.read(blobs.CHUNK_SIZE):
            yield piece
    except Exception as error:  # whatever the store's client raises: the answer is under way
        log.error("%s was cut short while it was sent: %s", what, error)
    finally:
        blob.close()


@bp.get("/runs/<int:run_id>/output")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.doc(responses={200: {"description": "The run's output folder as a gzipped tar archive.",
                         "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
                   404: "No such run, or no output yet."})
def get_run_output(run_id):
    """Download a run's output archive (streamed)."""
    return send_blob(auth.caller().id, run_id, "output", "application/gzip", f"run-{run_id}-output.tar.gz")


@bp.get("/runs/<int:run_id>/log")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.doc(responses={200: {"description": "The container's stdout and stderr.",
                         "content": {"text/plain": {"schema": {"type": "string"}}}},
                   404: "No such run, or no log yet."})
def get_run_log(run_id):
    """Download a run's container log."""
    return send_blob(auth.caller().id, run_id, "log", "text/plain", f"run-{run_id}.log")


@bp.get("/sites")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(PageIn, location="query")
@bp.output(SitePageOut)
def list_sites(query_data):
    """The sites, whether they are online, and whether their SPARQL endpoint answers."""
    return sites_page(_registry(), **query_data)


def sites_page(registry, page=1, per_page=50, now=None, include_revoked=False):
    """One page of the sites that are not revoked (or of all, for the operator), each with online: not revoked,
    and polled within the online window. Also the dashboard's list of sites."""
    now = time.time() if now is None else now
    registry.write_sightings()  # the claims' sightings noted meanwhile
    sites, total = store.list_sites(registry.engine, include_revoked=include_revoked, page=page, per_page=per_page)
    for site in sites:
        last_seen = site["last_seen_at"]
        site["online"] = (site["revoked_at"] is None and last_seen is not None
                          and now - last_seen < registry.settings.online_window_seconds)
    return {"items": sites, "total": total, "page": page, "per_page": per_page}


@bp.post("/keys")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.input(PublicKeyIn)
@bp.output(PublicKeyOut, status_code=201)
def add_public_key(json_data):
    """Register an age public key; encrypted tasks are encrypted to all of the caller's keys."""
    engine = _registry().engine
    key_id = store.add_researcher_key(engine, auth.caller().id, json_data["public_key"])
    log.info("researcher %s registered public key %s", auth.caller().name, key_id)
    return next(k for k in store.list_researcher_keys(engine, auth.caller().id) if k["id"] == key_id)


@bp.get("/keys")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.output(PublicKeyOut(many=True))
def list_public_keys():
    """The caller's registered public keys."""
    return store.list_researcher_keys(_registry().engine, auth.caller().id)


@bp.delete("/keys/<int:key_id>")
@bp.auth_required(auth.token_auth, roles=[auth.RESEARCHER])
@bp.output({}, status_code=204)
@bp.doc(responses=[404])
def remove_public_key(key_id):
    """Stop encrypting new tasks to this key (tasks already posted keep their recipients)."""
    store.remove_researcher_key(_registry().engine, auth.caller().id, key_id)
    return ""
