import os
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from werkzeug.serving import make_server

from client import disk_limits
from master import auth, store
from master.app import Settings, create_app

# The checkout, for tests that run its scripts and read its files.
ROOT = Path(__file__).resolve().parent.parent


# Modules whose every test starts several processes or runs a benchmark, beyond those using a federation.
SLOW_MODULES = {"test_balancer", "test_bench_smoke", "test_replicas", "test_tls"}


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_runner: the test drives a runner of tests/test_hostile_registry.py's "
                                       "pool, kept from test to test, instead of starting its own")


def pytest_collection_modifyitems(items):
    """Mark the slow tier, so that `scripts/test.sh -m "not slow"` is a quick run of everything else."""
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in SLOW_MODULES or any("federation" in name for name in item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def no_filesystems_left_mounted(tmp_path_factory):
    """Runners started in a test's folder leave their sessions' filesystems mounted (a runner keeps them for
    the next round): unmount them once the tests are done, so that the folders can be deleted."""
    yield
    disk_limits.release_all_under(tmp_path_factory.getbasetemp())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """Each registry test runs on the embedded SQLite store and on a real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def postgres_url():
    """The test database of the PostgreSQL server scripts/test.sh starts, empty. Emptied before each test, not after
    too: every user of the database empties it first (this fixture, bench/scale.py, bench/soak.py), and each
    emptying costs a connection and a query per table, for each of ~240 PostgreSQL tests."""
    url = os.environ.get("PHT_TEST_DATABASE_URL")
    if not url:
        pytest.skip("PHT_TEST_DATABASE_URL is not set: no PostgreSQL server (scripts/test.sh starts one)")
    _drop_all_tables(url)
    return url


def _drop_all_tables(url):
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        # An earlier test's registry may still answer a long-poll (a dashboard page's live wait, say) in a thread of
        # its own, its connection reading these tables: the drop would deadlock with it. Its test is over.
        conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    store.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def app(tmp_path, database_url):
    app = create_app(Settings(data_dir=tmp_path / "registry", database_url=database_url, lease_seconds=30))
    yield app
    app.extensions["pht"].engine.dispose()


@pytest.fixture
def served_app(app):
    """The test's registry app on a loopback port, for the library's HTTP client; yields its URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # Polled for shutdown every 50 ms, not 0.5 s: each test's teardown waits for it.
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    serving.join(timeout=10)


@pytest.fixture
def client(app):
    return app.test_client()


def _bearer_for(app, role, name):
    token = auth.new_token()
    store.create_principal(app.extensions["pht"].engine, role, name, auth.hash_token(token))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def make_researcher(app):
    return lambda name="alice": _bearer_for(app, store.RESEARCHER, name)


@pytest.fixture
def make_site(app):
    return lambda name="hospital-a": _bearer_for(app, store.SITE, name)
