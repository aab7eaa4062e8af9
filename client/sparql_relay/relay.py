"""The SPARQL relay: run in a helper container whose network namespace the algorithm's container joins.

It listens on 127.0.0.1:8890 in that namespace, which has no route out, and relays each
connection to the site runner's gateway on the Unix socket /gateway/sparql.sock (bound
in from the run's folder). It passes bytes on and nothing else: the gateway judges
every request. It prints "relay ready" once it listens, which the runner waits for
before it starts the algorithm. One thread, so a flood of connections cannot exhaust
the container's process limit; when the gateway is not there (the runner is
restarting) a connection is closed at once. When the gateway's backlog is full (the
algorithm holds many connections), a connection waits for room, up to GATEWAY_WAIT_SECONDS,
rather than being dropped.
"""

import asyncio
import socket

PORT = 8890
GATEWAY_SOCKET = "/gateway/sparql.sock"
CHUNK_BYTES = 64 * 1024
GATEWAY_WAIT_SECONDS = 10


async def pump(reader, writer):
    try:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other side sees the end of the request or answer
    except (ConnectionError, OSError):
        pass


async def connect_to_gateway():
    """A connection to the gateway. A Unix socket whose backlog is full refuses a connect with EAGAIN, which
    asyncio's own connect takes for one under way (and then for done): so the connect is made here, and tried
    again, less and less often, until there is room or GATEWAY_WAIT_SECONDS have passed. Raises OSError."""
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + GATEWAY_WAIT_SECONDS, 0.01
    while True:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.setblocking(False)
        try:
            connection.connect(GATEWAY_SOCKET)
        except BlockingIOError:
            connection.close()
            if loop.time() + pause > deadline:
                raise OSError("the gateway's backlog stayed full") from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)
            continue
        except OSError:
            connection.close()
            raise
        return await asyncio.open_unix_connection(sock=connection)


async def relay(client_reader, client_writer):
    try:
        gateway_reader, gateway_writer = await connect_to_gateway()
    except OSError:
        client_writer.close()
        return
    try:
        await asyncio.gather(pump(client_reader, gateway_writer), pump(gateway_reader, client_writer))
    finally:
        for writer in (client_writer, gateway_writer):
            writer.close()


async def main():
    server = await asyncio.start_server(relay, "127.0.0.1", PORT)
    print("relay ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
