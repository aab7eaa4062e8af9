"""A registry whose database connections are all in use answers 503 with Retry-After after a bounded wait,
never 500; and once one is free again it answers as before. On SQLite and on PostgreSQL."""

import pytest

from master import auth, store
from master.app import Settings, create_app


@pytest.fixture
def crowded_app(tmp_path, database_url):
    """A registry with a pool of one connection, which waits a tenth of a second for it."""
    app = create_app(Settings(data_dir=tmp_path / "registry", database_url=database_url,
                              database_pool_size=1, database_pool_wait_seconds=0.1))
    yield app
    app.extensions["pht"].engine.dispose()


def bearer(app, role, name):
    token = auth.new_token()
    store.create_principal(app.extensions["pht"].engine, role, name, auth.hash_token(token))
    return {"Authorization": f"Bearer {token}"}


def test_a_request_that_finds_no_free_connection_is_told_to_come_back(crowded_app):
    researcher = bearer(crowded_app, store.RESEARCHER, "alice")
    site = bearer(crowded_app, store.SITE, "hospital-a")
    client = crowded_app.test_client()
    assert client.get("/api/tasks", headers=researcher).status_code == 200

    with crowded_app.extensions["pht"].engine.connect():  # the pool's only connection, held
        for method, path, headers, body in [("get", "/api/tasks", researcher, None),
                                            ("post", "/api/tasks", researcher, {"image": "x/y:1", "input": "{}"}),
                                            ("post", "/api/site/claim", site, {"wait_seconds": 0})]:
            answer = getattr(client, method)(path, headers=headers, json=body)
            assert answer.status_code == 503, (path, answer.get_data(as_text=True))
            assert int(answer.headers["Retry-After"]) >= 1
            assert "busy" in answer.json["message"] and "try again" in answer.json["message"]

    assert client.get("/api/tasks", headers=researcher).json["items"] == []  # the refused post made nothing
    assert client.post("/api/tasks", headers=researcher, json={"image": "x/y:1", "input": "{}"}).status_code == 201
