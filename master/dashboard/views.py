"""The dashboard's pages at /ui/: a researcher's sessions, tasks and runs; the operator's sites and tasks.

Each page asks the store exactly what the REST API asks for the same token (master/researcher_api.py,
master/operator_api.py), with the same ownership checks: a researcher's task, run or session that is not
theirs answers the same 404 page as one that does not exist. Pages are plain HTML with plain links and
forms; only live updates need JavaScript (master/dashboard/live.py).

Every request reads the visitor's cookie (master/dashboard/login.py) and looks its token up again, every
POST must carry the visit's CSRF token, and every answer carries a Content-Security-Policy that lets the
page load only this registry's own stylesheet and script: no inline code, no other origin, no frames.
"""

import functools
import logging
import math
import time
from pathlib import Path

from apiflask import APIBlueprint
from apiflask.exceptions import HTTPError
from flask import current_app, g, jsonify, redirect, render_template, request, send_from_directory, url_for
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from master import auth, blobs, lifecycle, operator_api, researcher_api, store, wakeup
from master.dashboard import live, login, looks
from master.schemas import OperatorTaskQueryIn

log = logging.getLogger("pht.registry")

# An APIBlueprint kept out of the OpenAPI document (it describes the REST API, not pages): apiflask reads every
# blueprint's enable_openapi when it builds the document, which a plain Flask Blueprint lacks.
bp = APIBlueprint("dashboard", __name__, url_prefix="/ui", template_folder="templates", enable_openapi=False)

CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STATIC_DIR = Path(__file__).parent / "static"
# Content types named here, not guessed from the machine's MIME table: under nosniff a browser runs a script
# or applies a stylesheet only when it is sent as one.
STATIC_FILES = {"dashboard.css": "text/css", "live.js": "text/javascript"}

PER_PAGE = 50
SITES_PER_PAGE = 200
MAX_TOKEN_CHARS = 512
# The end of a log a task's page shows; more is downloaded. A store that cannot seek (S3) is read from the
# start, for logs up to MAX_LOG_SCAN_BYTES.
LOG_TAIL_BYTES = 16 * 1024
MAX_LOG_SCAN_BYTES = 1024 * 1024
NOT_YOURS = "There is no such page, or it is not yours to see."
DROP_COOKIE = object()  # what a view sets g.session_cookie to when the answer must delete the session cookie


def _registry():
    return current_app.extensions["pht"]


def _engine():
    return _registry().engine


# --- who is looking -------------------------------------------------------------------------------------

@bp.before_request
def _know_the_visitor():
    g.now = time.time()
    g.principal, g.session_expired = None, False
    # What to do with the cookies once the page is answered: a Visit to set, DROP_COOKIE, or None for nothing.
    g.session_cookie = g.login_cookie = None
    signer = login.cookie_signer(current_app.config["DASHBOARD_COOKIE_SECRET"])
    sent_session = request.cookies.get(login.COOKIE_NAME)
    session = login.visit_from_cookie(signer, sent_session)
    if session is not None and session.token_hash is not None and not login.is_expired(session, g.now):
        found = _registry().tokens.find(session.token_hash)
        if found is not None and found[0] != store.SITE:
            g.principal = auth.Principal(*found)
    g.session_expired = session is not None and login.is_expired(session, g.now)
    if g.principal is not None:
        visit = session
    else:
        if sent_session is not None:  # forged, revoked, rotated, expired: logged out from now on
            g.session_cookie = DROP_COOKIE
        visit = login.visit_from_cookie(signer, request.cookies.get(login.LOGIN_COOKIE_NAME))
        if visit is None:
            visit = g.login_cookie = login.new_visit()
    g.visit = visit
    if request.method == "POST" and not login.csrf_matches(visit, request.form.get("csrf")):
        return _error_page(400, "This form is out of date, or was not sent from this dashboard. "
                                "Go back, reload the page and send it again.")
    return None


@bp.after_request
def _protect(response):
    signer = login.cookie_signer(current_app.config["DASHBOARD_COOKIE_SECRET"])
    options = dict(
        path="/ui/", httponly=True, samesite="Strict",
        # Behind a balancer that ends TLS the request is plain HTTP: its X-Forwarded-Proto counts too. A client
        # that sends it falsely only keeps its own cookie from plain HTTP.
        secure=request.is_secure or request.headers.get("X-Forwarded-Proto") == "https")
    for name, change in ((login.COOKIE_NAME, g.get("session_cookie")),
                         (login.LOGIN_COOKIE_NAME, g.get("login_cookie"))):
        if change is DROP_COOKIE:
            response.delete_cookie(name, **options)
        elif change is not None:
            response.set_cookie(name, login.cookie_value(signer, change), **options)
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "dashboard.static_file":
        response.headers["Cache-Control"] = "no-store"
    return response


def for_role(role):
    """Only a visitor logged in with this role's token sees the view; others are sent to log in, or told."""
    def decorate(view):
        @functools.wraps(view)
        def gated(**kwargs):
            if g.principal is None:
                if request.path.startswith("/ui/live/"):
                    return jsonify(message="log in first"), 401
                return redirect(url_for(".login_page", ended=1 if g.session_expired else None))
            if g.principal.role != role:
                return _error_page(403, f"This page is for {role}s; you are logged in as {g.principal.role} "
                                        f"{g.principal.name}.")
            return view(**kwargs)
        return gated
    return decorate


@bp.context_processor
def _page_helpers():
    return {
        "principal": g.get("principal"), "csrf": g.visit.csrf if "visit" in g else "",
        "ago": lambda at: looks.relative_time(at, g.now), "utc": looks.utc_time, "iso": looks.iso_time,
        "state_class": looks.state_class, "state_words": looks.state_words, "shown": looks.shown,
        "progress": looks.progress, "size": looks.size,
        "online_window": looks.duration(_registry().settings.online_window_seconds),
    }


def _error_page(status, message):
    return render_template("dashboard/error.html", status=status, message=message), status


@bp.errorhandler(store.NotFound)
def _not_found(_error):
    return _error_page(404, NOT_YOURS)


@bp.errorhandler(HTTPError)
def _api_error(error):
    return _error_page(error.status_code, error.message)


@bp.errorhandler(HTTPException)
def _http_error(error):
    return _error_page(error.code, error.description)


@bp.get("/<path:anything>")
def unknown_page(anything):
    return _error_page(404, NOT_YOURS)


@bp.get("/static/<name>")
def static_file(name):
    if name not in STATIC_FILES:
        return _error_page(404, NOT_YOURS)
    return send_from_directory(STATIC_DIR, name, mimetype=STATIC_FILES[name])


# --- logging in and out ------------------------------------------------------------------------------------

@bp.get("/")
def home():
    if g.principal is None:
        return redirect(url_for(".login_page"))
    if g.principal.role == auth.OPERATOR:
        return redirect(url_for(".operator_sites"))
    return redirect(url_for(".sessions_page"))


@bp.get("/login")
def login_page():
    if g.principal is not None:
        return redirect(url_for(".home"))
    ended = g.session_expired or request.args.get("ended") == "1"
    return render_template("dashboard/login.html", problem="Your session ended; log in again." if ended else None)


@bp.post("/login")
def log_in():
    token = request.form.get("token", "").strip()
    looks_like_a_token = 0 < len(token) <= MAX_TOKEN_CHARS
    found = _registry().tokens.find(auth.hash_token(token)) if looks_like_a_token else None
    refusal = login.refusal(looks_like_a_token, found)
    if refusal:
        return render_template("dashboard/login.html", problem=refusal[0]), refusal[1]
    g.session_cookie = login.logged_in(auth.hash_token(token), g.now)
    log.info("dashboard: %s %s logged in", found[0], found[2])
    return redirect(url_for(".home"), 303)


@bp.post("/logout")
def log_out():
    g.session_cookie = DROP_COOKIE
    return redirect(url_for(".login_page"), 303)


# --- a researcher's pages ----------------------------------------------------------------------------------

def _page_number(total, per_page=PER_PAGE, start_at_last=True):
    """The page asked for (?page=N), or else the last one, which holds the newest (the first one for a list in
    name order: start_at_last=False); 400 for what is not a page."""
    last = max(1, math.ceil(total / per_page))
    asked = request.args.get("page")
    if asked is None:
        return last if start_at_last else 1, last
    if not (asked.isascii() and asked.isdigit()) or not 1 <= int(asked) <= last:  # not "²", which int() refuses
        raise _BadInput(f"page must be a number from 1 to {last}")
    return int(asked), last


class _BadInput(Exception):
    pass


@bp.errorhandler(_BadInput)
def _bad_input(error):
    return _error_page(400, str(error))


@bp.get("/sessions")
@for_role(auth.RESEARCHER)
def sessions_page():
    _, total = store.list_sessions(_engine(), g.principal.id, page=1, per_page=1)
    page, last = _page_number(total)
    sessions, total = store.list_sessions(_engine(), g.principal.id, page=page, per_page=PER_PAGE)
    return render_template("dashboard/sessions.html", sessions=list(reversed(sessions)), total=total,
                           page=page, last_page=last)


@bp.get("/sessions/<int:session_id>")
@for_role(auth.RESEARCHER)
def session_page(session_id):
    tasks, total = _session_tasks(session_id)
    return render_template("dashboard/session.html", session_id=session_id, tasks=tasks, total=total,
                           live_url=url_for(".live_session", session_id=session_id),
                           fingerprint=live.tasks_fingerprint(tasks, total))


def _session_tasks(session_id):
    """The session's tasks in round order (the first 200: a session of more is read through the API). A session
    that is not the researcher's has no tasks for them: the same 404 as one that does not exist."""
    tasks, total = store.list_tasks(_engine(), g.principal.id, session_id=session_id, page=1, per_page=200)
    if total == 0:
        raise store.NotFound(f"session {session_id} does not exist")
    return tasks, total


@bp.get("/tasks/<int:task_id>")
@for_role(auth.RESEARCHER)
def task_page(task_id):
    task = store.get_task(_engine(), task_id, g.principal.id)
    for run in task["runs"]:
        run["history"] = store.run_history(_engine(), run["id"])
        run["log_tail"], run["log_note"] = _log_tail(run, encrypted=bool(task["encrypted_to"]))
    return render_template("dashboard/task.html", task=task, live_url=url_for(".live_task", task_id=task_id),
                           fingerprint=live.tasks_fingerprint([task]),
                           cancellable=task["status"] == lifecycle.TaskStatus.ACTIVE)


def _log_tail(run, encrypted):
    """(the last lines of the run's log, or None; a note on why there are none, or None)."""
    if run["log_sha256"] is None:
        return None, None
    if encrypted:
        return None, "The log is encrypted to your key: download it and open it with your identity file."
    size = run["log_size"]
    try:
        blob = _registry().open_result(run["log_sha256"], size)
    except (blobs.BlobMissing, blobs.StoreUnreachable) as error:
        log.error("dashboard: the log of run %s cannot be shown: %s", run["id"], error)
        return None, "The registry cannot read this log now; try again later."
    try:
        start = max(0, size - LOG_TAIL_BYTES)
        if start and getattr(blob, "seekable", lambda: False)():
            blob.seek(start)
        elif start and size > MAX_LOG_SCAN_BYTES:
            return None, "The log is long: download it to read its end."
        elif start:
            blob.read(start)
        return looks.log_tail(blob.read(LOG_TAIL_BYTES), cut_at_start=start > 0), None
    finally:
        blob.close()


@bp.post("/tasks/<int:task_id>/cancel")
@for_role(auth.RESEARCHER)
def cancel_task(task_id):
    cancelled = store.cancel_task(_engine(), task_id, g.principal.id)
    _registry().ended_tasks.announce([task_id])
    log.info("dashboard: task %s cancelled by researcher %s; runs %s", task_id, g.principal.name, cancelled)
    return redirect(url_for(".task_page", task_id=task_id), 303)


@bp.get("/runs/<int:run_id>/output")
@for_role(auth.RESEARCHER)
def run_output(run_id):
    return researcher_api.send_blob(g.principal.id, run_id, "output", "application/gzip",
                                    f"run-{run_id}-output.tar.gz")


@bp.get("/runs/<int:run_id>/log")
@for_role(auth.RESEARCHER)
def run_log(run_id):
    return researcher_api.send_blob(g.principal.id, run_id, "log", "text/plain", f"run-{run_id}.log")


def _sites_page_number(sites_page):
    """(the page of sites asked for, the last page): ?page=N, or the first, as sites are listed by name.
    sites_page is the API's (researcher_api's or operator_api's)."""
    total = sites_page(_registry(), page=1, per_page=1)["total"]
    return _page_number(total, SITES_PER_PAGE, start_at_last=False)


def _sites_page_view(sites_page, for_operator, live_endpoint):
    page, last = _sites_page_number(sites_page)
    sites = sites_page(_registry(), page=page, per_page=SITES_PER_PAGE, now=g.now)
    return render_template("dashboard/sites.html", sites=sites["items"], total=sites["total"],
                           for_operator=for_operator, page=page, last_page=last,
                           live_url=url_for(live_endpoint, page=page),
                           fingerprint=live.sites_fingerprint(sites["items"]))


@bp.get("/sites")
@for_role(auth.RESEARCHER)
def researcher_sites():
    return _sites_page_view(researcher_api.sites_page, False, ".live_researcher_sites")


# --- the operator's pages ----------------------------------------------------------------------------------

@bp.get("/operator/sites")
@for_role(auth.OPERATOR)
def operator_sites():
    return _sites_page_view(operator_api.sites_page, True, ".live_operator_sites")


def _task_filters():
    """The operator's filters from the query string, checked by the API's own schema; empty fields are unset."""
    given = {name: value.strip() for name, value in request.args.items()
             if name in ("researcher", "site", "status", "page") and value.strip()}
    try:
        return OperatorTaskQueryIn().load({**given, "per_page": PER_PAGE})
    except ValidationError as error:
        raise _BadInput("; ".join(f"{field}: {' '.join(messages)}"
                                  for field, messages in error.normalized_messages().items())) from None


@bp.get("/operator/tasks")
@for_role(auth.OPERATOR)
def operator_tasks():
    filters = _task_filters()
    if "page" not in request.args:  # the newest first: the last page
        total = operator_api.tasks_page(_registry(), **{**filters, "per_page": 1})["total"]
        filters["page"] = max(1, math.ceil(total / PER_PAGE))
    found = operator_api.tasks_page(_registry(), **filters)
    last_page = max(1, math.ceil(found["total"] / PER_PAGE))
    shown_filters = {name: filters.get(name) or "" for name in ("researcher", "site", "status")}
    return render_template("dashboard/operator_tasks.html", tasks=list(reversed(found["items"])),
                           total=found["total"], page=found["page"], last_page=last_page,
                           filters=shown_filters, task_states=[str(state) for state in lifecycle.TaskStatus],
                           live_url=url_for(".live_operator_tasks", **{**shown_filters, "page": found["page"]}),
                           fingerprint=live.tasks_fingerprint(found["items"], found["total"]))


# --- live updates (static/live.js) ---------------------------------------------------------------------------

def _live_answer(look):
    since = request.args.get("since", "")
    if not live.FINGERPRINT.fullmatch(since):
        return jsonify(message="since must be a page's fingerprint (hex)"), 400
    config = current_app.config
    fingerprint = live.answer_when_changed(look, since, _registry().ended_tasks,
                                           config.get("DASHBOARD_RECHECK_SECONDS", wakeup.RECHECK_SECONDS),
                                           config.get("DASHBOARD_WAIT_SECONDS", live.WAIT_SECONDS))
    return jsonify(fingerprint=fingerprint)


@bp.get("/live/sessions/<int:session_id>")
@for_role(auth.RESEARCHER)
def live_session(session_id):
    def look():
        tasks, total = _session_tasks(session_id)
        return live.tasks_fingerprint(tasks, total), live.news_key(tasks)
    look()  # a session that is not the caller's answers 404 at once
    return _live_answer(look)


@bp.get("/live/tasks/<int:task_id>")
@for_role(auth.RESEARCHER)
def live_task(task_id):
    def look():
        return live.tasks_fingerprint([store.get_task(_engine(), task_id, g.principal.id)]), task_id
    look()
    return _live_answer(look)


@bp.get("/live/sites")
@for_role(auth.RESEARCHER)
def live_researcher_sites():
    return _live_sites_answer(researcher_api.sites_page)


@bp.get("/live/operator/sites")
@for_role(auth.OPERATOR)
def live_operator_sites():
    return _live_sites_answer(operator_api.sites_page)


def _live_sites_answer(sites_page):
    page, _ = _sites_page_number(sites_page)

    def look():  # online is decided at each look: a site that stops polling goes offline while the page waits
        return live.sites_fingerprint(sites_page(_registry(), page=page, per_page=SITES_PER_PAGE)["items"]), None
    return _live_answer(look)


@bp.get("/live/operator/tasks")
@for_role(auth.OPERATOR)
def live_operator_tasks():
    filters = _task_filters()

    def look():
        found = operator_api.tasks_page(_registry(), **filters)
        return live.tasks_fingerprint(found["items"], found["total"]), live.news_key(found["items"])
    return _live_answer(look)
