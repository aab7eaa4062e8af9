"""Builds the registry's web application. Nothing happens at import time."""

import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from apiflask import APIFlask, abort
from flask import g, request

from common.names import MAX_INLINE_BYTES
from common.private_files import private_file, private_folder
from master import api_docs, blobs, json_bodies, lifecycle, operator_api, researcher_api, site_api, store
from master.dashboard import register_dashboard
from master.schemas import INT_MAX
from master.sightings import Sightings
from master.token_cache import TokenCache
from master.wakeup import Announcements, PostgresRelay

log = logging.getLogger("pht.registry")

API_VERSION = "1.6"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str = ""  # empty: SQLite in data_dir
    lease_seconds: int = 60
    max_input_bytes: int = 4 * 1024 * 1024
    max_result_bytes: int = 2 * 1024 ** 3
    result_store: str = ""  # empty: the folder blobs/ in data_dir; else s3://bucket/prefix (master/blobs.py)
    s3_endpoint_url: str = ""
    # A site counts as online while its last poll is this recent.
    online_window_seconds: int = 120
    # Database connections this process keeps, and how long a request waits for a free one before its 503: long
    # enough for the storm of 10,000 sites' first claims after a restart on PostgreSQL (docs/performance.md §3),
    # within the 60 s that runners and the researcher library wait for an answer.
    database_pool_size: int = 20
    database_pool_wait_seconds: float = 30

    def resolved_database_url(self):
        return self.database_url or f"sqlite:///{self.sqlite_path}"

    @property
    def sqlite_path(self):
        return Path(self.data_dir) / "registry.sqlite"


def open_data(settings):
    """The registry's database, with its data folder made private (0700) first, and the embedded
    SQLite file (task inputs, token hashes) made 0600 before SQLite first creates it."""
    private_folder(settings.data_dir)
    if not settings.database_url:
        private_file(settings.sqlite_path)
    return store.open_database(settings.resolved_database_url(), settings.database_pool_size,
                               settings.database_pool_wait_seconds)


@dataclass
class Registry:
    """What every request handler shares: settings, database, result files, long-poll wake-ups."""
    settings: Settings
    engine: object
    blobs: blobs.FolderStore | blobs.S3Store
    work_for_sites: Announcements  # by site id: a run became pending for it
    ended_tasks: Announcements  # by task id: one of its runs ended, or waits for its site
    sightings: Sightings  # when each site was last written down as seen
    tokens: TokenCache  # who holds each token, as far as this process has looked
    # On PostgreSQL, news also goes to (and comes from) the registry's other replicas.
    relay: PostgresRelay | None = None
    # serve: sightings are written in batches, by write_sightings_periodically and before sites are read.
    batch_sightings: bool = False

    def saw_site(self, site_id, runner_version, sparql_ok):
        """Write down that the site is alive, and what it reports, when that is news (master/sightings.py): at
        once, or with batch_sightings, with the others of the next write_sightings()."""
        report = (runner_version, sparql_ok)
        if self.sightings.due(site_id, report):
            self.sightings.note(site_id, report, time.time())
            if not self.batch_sightings:
                self.write_sightings()

    def write_sightings(self):
        """Write the sightings noted since the last write, in one transaction; a reader of sites calls it first.
        What a database hiccup kept out is written with the next ones."""
        unwritten = self.sightings.take_unwritten()
        if not unwritten:
            return
        try:
            store.record_sites_seen(self.engine, unwritten)
        except Exception:
            self.sightings.give_back(unwritten)
            raise

    def open_result(self, sha256, size):
        """A run's output or log as a binary file to read from: kept in the database when it came within a finish
        report (store.small_results), in the result store otherwise. Raises as blobs' open()."""
        if size <= MAX_INLINE_BYTES:
            data = store.small_results_of(self.engine, [sha256]).get(sha256)
            if data is not None:
                if len(data) != size:
                    raise blobs.BlobMissing(f"the database holds {len(data)} bytes of {sha256}, not {size}")
                return io.BytesIO(data)
        return self.blobs.open(sha256, size)

    def hears_every_announcement(self):
        """True when every announcement reaches this process: one registry alone, or replicas whose relay listens."""
        return self.relay is None or self.relay.listening.is_set()

    def expire_lapsed_leases(self):
        """Requeue (or fail) runs whose lease ran out, and wake the sites that got them back."""
        expired = store.expire_overdue_leases(self.engine)
        for run_id, _, status, _ in expired:
            log.info("run %s lease expired; run is now %s", run_id, status)
        self.work_for_sites.announce({site_id for _, site_id, status, _ in expired if status == lifecycle.PENDING})
        self.ended_tasks.announce({task_id for _, _, status, task_id in expired if status != lifecycle.PENDING})


def create_app(settings):
    engine = open_data(settings)
    app = APIFlask("pht-registry", title="Personal Health Train registry", version=API_VERSION,
                   spec_path="/openapi.json", docs_path=None)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_input_bytes * 2,  # base64 input and JSON framing
        SECURITY_SCHEMES={"BearerAuth": {"type": "http", "scheme": "bearer"}},
        INFO={"description": "Tasks for sites to run, and their results. See docs/api.md."},
    )
    registry = app.extensions["pht"] = Registry(
        settings=settings,
        engine=engine,
        blobs=blobs.open_store(settings.result_store, settings.data_dir, settings.s3_endpoint_url),
        work_for_sites=Announcements("pht_work_for_sites"),
        ended_tasks=Announcements("pht_ended_tasks"),
        sightings=Sightings(refresh_seconds=settings.online_window_seconds / 2),
        tokens=TokenCache(engine),
    )
    if engine.dialect.name == "postgresql":
        registry.relay = PostgresRelay(engine, [registry.work_for_sites, registry.ended_tasks, registry.tokens])
    json_bodies.read_checked()
    app.register_blueprint(researcher_api.bp)
    app.register_blueprint(site_api.bp)
    app.register_blueprint(operator_api.bp)
    api_docs.register_api_docs(app)  # /docs, from local files
    register_dashboard(app)  # /ui/, for people
    _register_health(app)
    _register_error_mapping(app)
    _register_request_log(app)
    app.spec_processor(_complete_request_bodies)
    return app


def expire_leases_periodically(app, stop, interval_seconds):
    """Return runs with a lapsed lease to the queue, and wake the sites that get them back.

    The only place leases expire: claims do not look, so that a claim costs one query when there is nothing for
    its site. Run it in a background thread (a greenlet under gevent) until stop is set.
    """
    registry = app.extensions["pht"]
    while not stop.wait(interval_seconds):
        try:
            registry.expire_lapsed_leases()
        except Exception:  # a database hiccup must not end the sweeping for good
            log.exception("expiring overdue leases failed; trying again in %s s", interval_seconds)


# How often `serve` writes the sightings noted meanwhile: how late a site's first claim shows it online to another
# replica's readers, or in the database (a reader in this process writes them first).
SIGHTINGS_WRITE_SECONDS = 1


def write_sightings_periodically(app, stop, interval_seconds=SIGHTINGS_WRITE_SECONDS):
    """Write the sightings noted by claims, in one transaction each time, until stop is set (run it in a
    background thread, a greenlet under gevent); from then on, claims only note them."""
    registry = app.extensions["pht"]
    registry.batch_sightings = True
    while not stop.wait(interval_seconds):
        try:
            registry.write_sightings()
        except Exception:  # a database hiccup: the sightings are written with the next ones
            log.exception("writing sites' sightings failed; trying again in %s s", interval_seconds)


def hear_other_replicas(app, stop):
    """On PostgreSQL, wake this replica's long-polls with the news of the others until stop is set (run it
    in a background thread, a greenlet under gevent); on SQLite, return at once."""
    relay = app.extensions["pht"].relay
    if relay is not None:
        relay.listen(stop)


# /health needs no token, and a balancer asks every few seconds: the result store (a request to S3 for a
# bucket) is asked at most this often.
STORE_CHECK_SECONDS = 5


def _register_health(app):
    last = {"problems": {}, "store_checked_at": -STORE_CHECK_SECONDS, "store_problem": None}

    @app.get("/health")
    @app.doc(tags=["Health"], responses={
        200: "The registry is up. `status` is `ok`, or `degraded` while its result store does not answer "
             "(`problems` says so): claims, heartbeats and reports go on, uploads and downloads of results "
             "answer 503. A store shared by every replica must not take them all out of a balancer at once.",
        503: "The database does not answer (`problems` says so): a load balancer sends this replica nothing "
             "meanwhile."})
    def health():
        """Readiness check; needs no token. Says which part fails, not how: that is in the registry's log."""
        registry = app.extensions["pht"]
        problems = {}
        try:
            with registry.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except sa.exc.SQLAlchemyError as error:
            problems["the database does not answer"] = str(getattr(error, "orig", None) or error)
        if time.monotonic() - last["store_checked_at"] >= STORE_CHECK_SECONDS:
            last["store_problem"], last["store_checked_at"] = registry.blobs.problem(), time.monotonic()
        if last["store_problem"]:
            problems["the result store does not answer"] = last["store_problem"]
        if problems.keys() != last["problems"].keys():  # the log says when the answer changes, not each time
            if problems:
                log.error("unhealthy: %s", "; ".join(f"{what}: {why}" for what, why in problems.items()))
            else:
                log.info("healthy again")
        last["problems"] = problems
        if "the database does not answer" in problems:
            return {"status": "unavailable", "problems": list(problems)}, 503
        return {"status": "degraded", "problems": list(problems)} if problems else {"status": "ok"}


# What a request that found every database connection in use is told: soon, not at once, so that a crowd of
# runners does not come back together.
BUSY_RETRY_AFTER_SECONDS = 2


def _register_error_mapping(app):
    for exception, status in ((store.NotFound, 404), (store.Conflict, 409), (store.LeaseLost, 409)):
        app.register_error_handler(
            exception, lambda error, status=status: ({"message": str(error), "detail": {}}, status))

    @app.errorhandler(sa.exc.TimeoutError)
    def _database_busy(_error):
        # The pool raises it before the transaction that wanted the connection began. Every request may be sent
        # again: one that had committed an earlier transaction finds it done (a claim's lease, if one was given,
        # lapses and the run is handed out again).
        settings = app.extensions["pht"].settings
        log.warning("%s %s: all %d database connections were in use for %s s; answered 503", request.method,
                    request.path, settings.database_pool_size, settings.database_pool_wait_seconds)
        return ({"message": f"the registry's database is busy; try again in {BUSY_RETRY_AFTER_SECONDS} s",
                 "detail": {}}, 503, {"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})


def _register_request_log(app):
    @app.before_request
    def _start_clock():
        g.started = time.perf_counter()

    @app.before_request
    def _reject_impossible_ids():
        # /api/tasks/99999999999999999999 names nothing: the database's ids are 32-bit.
        for name, value in (request.view_args or {}).items():
            if isinstance(value, int) and value > INT_MAX:
                abort(404, f"{name} {value} does not exist")

    @app.after_request
    def _log_request(response):
        # A claim that found nothing is the one request an idle site makes, every long-poll: at INFO, a thousand
        # idle sites would write three million lines a day, and a tenth of each renewal's cost is its line.
        nothing_claimed = response.status_code == 204 and request.endpoint == "sites.claim_run"
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        log.log(logging.DEBUG if nothing_claimed else logging.INFO, "%s %s -> %s (%.1f ms)", request.method,
                request.full_path.rstrip("?"), response.status_code, elapsed_ms)
        return response


def _complete_request_bodies(spec):
    """Say in the document what the code enforces about request bodies.

    Streamed-file endpoints carry our x-raw-body marker, turned into their requestBody here; and a
    JSON body whose schema has required fields is itself required (apiflask leaves it optional).
    """
    schemas = spec.get("components", {}).get("schemas", {})
    for path in spec["paths"].values():
        for operation in path.values():
            raw = operation.pop("x-raw-body", None)
            if raw:
                operation["requestBody"] = {"required": True, "content": {
                    media: {"schema": {"type": "string", "format": "binary", "description": text}}
                    for media, text in raw.items()}}
            body_schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            referenced = schemas.get(body_schema.get("$ref", "").rpartition("/")[2], body_schema)
            if referenced.get("required"):
                operation["requestBody"]["required"] = True
    return spec
