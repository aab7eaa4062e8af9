"""What a registry process keeps of its runs' results, read from its data folder: for tests that check what
reached the registry (ciphertext only, say), or that nothing did."""

import sqlalchemy as sa

from master import store


def stored_results(registry_data):
    """{sha256: bytes} of every output and log the registry with this data folder (SQLite) keeps: files in its
    result store, and those that came within a finish report, in its database (store.small_results)."""
    files = {path.name: path.read_bytes() for path in (registry_data / "blobs").glob("??/*")}
    engine = sa.create_engine(f"sqlite:///{registry_data / 'registry.sqlite'}")
    try:
        with engine.connect() as conn:
            kept = dict(conn.execute(sa.select(store.small_results.c.sha256, store.small_results.c.data)).all())
    finally:
        engine.dispose()
    return {**files, **kept}
