"""The relay's own code, in-process against a real Unix socket: what it does when the gateway cannot take a
connection yet."""

import asyncio
import importlib.util
import socket
import types

import pytest

from client.containers import RELAY_FOLDER


@pytest.fixture
def relay(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("pht_sparql_relay", RELAY_FOLDER / "relay.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "GATEWAY_SOCKET", str(tmp_path / "sparql.sock"))
    return module


def full_gateway(path):
    """A listening socket whose backlog is full: (it, the connections that fill it)."""
    gateway = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    gateway.bind(path)
    gateway.listen(0)
    queued = []
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            connection.connect(path)
        except BlockingIOError:
            connection.close()
            return gateway, queued
        queued.append(connection)


def test_a_connection_waits_for_room_in_a_full_gateway_backlog_instead_of_being_dropped(relay, monkeypatch):
    gateway, queued = full_gateway(relay.GATEWAY_SOCKET)

    async def scenario():
        met_the_full_backlog = asyncio.Event()

        async def pause(seconds):  # the relay's wait before it tries again, seen by the test
            met_the_full_backlog.set()
            await asyncio.sleep(seconds)

        monkeypatch.setattr(relay, "asyncio", types.SimpleNamespace(
            get_running_loop=asyncio.get_running_loop, sleep=pause, open_unix_connection=asyncio.open_unix_connection))
        connecting = asyncio.ensure_future(relay.connect_to_gateway())
        await asyncio.wait_for(met_the_full_backlog.wait(), 30)
        for connection in queued:  # the gateway takes what waited before it, and room is made
            gateway.accept()[0].close()
            connection.close()
        _reader, writer = await asyncio.wait_for(connecting, 30)
        writer.write(b"ASK")
        await writer.drain()
        writer.close()

    asyncio.run(scenario())
    accepted, _ = gateway.accept()
    assert accepted.recv(16) == b"ASK", "the relay took a refused connect for a connection"
    gateway.close()


def test_with_no_gateway_a_connection_fails_at_once(relay):
    with pytest.raises(OSError):
        asyncio.run(relay.connect_to_gateway())  # no socket at all: the runner restarts
