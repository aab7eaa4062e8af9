"""The WSGI server of the registry and the FileService: gevent's, so each waiting long-poll or
slow upload is a cheap greenlet, not a thread."""

import logging
import socket

from gevent.pywsgi import WSGIServer

# Thousands of sites may reconnect at once (after a restart, say); the default backlog of a
# few hundred would refuse some of them.
LISTEN_BACKLOG = 4096


class _NoDelayServer(WSGIServer):
    def handle(self, client_socket, address):
        # The server writes a response's headers and body separately; with Nagle's algorithm on,
        # the body then waits for the client's delayed ACK: 40 ms added to every request.
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(client_socket, address)


def serve_forever(app, host, port):
    _NoDelayServer((host, port), app, log=None, error_log=logging.getLogger("pht.wsgi"),
                   backlog=LISTEN_BACKLOG).serve_forever()
