"""The WSGI server of the registry and the FileService: gevent's, so each waiting long-poll or
slow upload is a cheap greenlet, not a thread.

An open connection costs a file descriptor and a greenlet for as long as the client keeps it, so no
client may keep one without sending or taking anything. (Slowloris: 1,000 half-sent requests, a
header byte every few seconds, once held a descriptor each for good; under an open-file limit of 400,
420 of them made /health time out.) The rules, each a `serve` option (ServerLimits):

- --header-seconds (10): a request's line and headers must all be in within this deadline, counted
  from the connection's opening (or from the first byte of a kept-alive connection's next request).
  It is one deadline for the whole head: a byte every few seconds does not extend it.
- A request's headers may hold MAX_HEADER_BYTES (64 KiB) in all, or the request gets 400 (gevent alone
  reads 100 lines of 64 KiB, 6.4 MB, held in memory for each connection still sending its head).
- --stall-seconds (60): a request body that brings no byte for this long is dropped (the application
  sees werkzeug's 408), and so is an answer the client takes nothing of for this long. The timeout
  counts from the last byte that moved, so an upload of gigabytes that keeps moving goes on.
- --keep-alive-seconds (75): a kept-alive connection with no next request for this long is closed.
  Above the 60 s idle timeout of common load balancers, so that they close first and never send a
  request on a connection this server has just closed.
- What the application leaves unread of a body (an upload answered 401, 409 or 413 at once) is read
  and dropped, so that a client still sending gets to read the answer, but for no longer than the
  header deadline; then the connection is closed.
- --max-connections (10,000, and never more than the open-file limit leaves room for): more are
  answered 503 with Retry-After and closed at once, without blocking the accept loop.
- --max-idle-per-address (256; 0 for no cap): a connection is idle while no request is in progress on
  it (its headers are still coming, or it is kept alive between requests). One address holding that
  many idle connections gets 503 for a new one, and its kept-alive connections are closed instead
  of kept. Requests in progress never count: thousands of sites may long-poll from one address.

None of this touches a long-poll. While the application waits (a site's claim, a researcher's
wait_seconds) the server neither reads nor writes: the answer is written late, not read slowly.

Deployment. Sites connecting directly, one address each: the defaults suit, a runner keeps a few
connections. Behind a load balancer or reverse proxy every connection comes from its address, and
the idle cap then counts the proxy's own pool of kept-alive connections: keep it above the pool's
size (traefik keeps up to 200 idle per backend by default; nginx what its `keepalive` says, per
worker), or set 0 and let the proxy limit its clients. A proxy that reads whole requests before
passing them on (nginx does) also takes the slow clients off this server.
"""

import collections
import errno
import functools
import http.client
import json
import logging
import math
import socket
import ssl
import time
from dataclasses import dataclass, replace

import click
from gevent import Timeout
from gevent.pywsgi import Input, WSGIHandler, WSGIServer
from werkzeug.exceptions import RequestTimeout

log = logging.getLogger("pht.wsgi")

# Thousands of sites may reconnect at once (after a restart, say); the default backlog of a
# few hundred would refuse some of them.
LISTEN_BACKLOG = 4096
# Open files that connections may not take: the database's pool, SQLite's files, logs, and the result
# file that each upload or download holds besides its socket.
OPEN_FILES_RESERVED_SHARE = 0.1
OPEN_FILES_RESERVED_AT_LEAST = 100
# All of a request's headers together: ours are a token and a few more; common web servers allow 8 to 64 KiB.
MAX_HEADER_BYTES = 64 * 1024
# Refusals and drops come by the thousand during an attack; the log gets a summary this often.
DROP_LOG_INTERVAL_SECONDS = 60


@dataclass(frozen=True)
class ServerLimits:
    """How long a client may take and how many connections it may hold; see the module's docstring."""
    header_seconds: float = 10.0
    stall_seconds: float = 60.0
    keep_alive_seconds: float = 75.0
    max_connections: int = 10_000
    max_idle_per_address: int = 256  # 0: no cap


def connection_ceiling(open_file_limit):
    """The most connections that leave the process room for its other open files."""
    reserved = max(OPEN_FILES_RESERVED_AT_LEAST, int(open_file_limit * OPEN_FILES_RESERVED_SHARE))
    return max(1, open_file_limit - reserved)


def refusal_reason(limits, open_connections, idle_from_address):
    """Why a new connection is refused, or None to serve it; the reason names the option that caps it."""
    if open_connections >= limits.max_connections:
        return f"{limits.max_connections} connections were open (--max-connections)"
    if limits.max_idle_per_address and idle_from_address >= limits.max_idle_per_address:
        return (f"the address already held {limits.max_idle_per_address} idle connections (--max-idle-per-address;"
                f" 0 turns this cap off, as behind a load balancer)")
    return None


def limit_options(command):
    """The serve commands' options for ServerLimits, shared by the registry and the FileService: the
    command is called with limits=ServerLimits(...) in their place."""
    defaults = ServerLimits()
    seconds = click.FloatRange(min=0, min_open=True)

    @click.option("--header-seconds", type=seconds, default=defaults.header_seconds, show_default=True,
                  help="A request's line and headers must all arrive within this many seconds (Slowloris).")
    @click.option("--stall-seconds", type=seconds, default=defaults.stall_seconds, show_default=True,
                  help="Drop a request body, or an answer, that moves no byte for this long; slow but moving is fine.")
    @click.option("--keep-alive-seconds", type=seconds, default=defaults.keep_alive_seconds, show_default=True,
                  help="Close a kept-alive connection that sends no next request for this long.")
    @click.option("--max-connections", type=click.IntRange(1), default=defaults.max_connections, show_default=True,
                  help="Most connections at once (lowered to fit the open-file limit); more get 503.")
    @click.option("--max-idle-per-address", type=click.IntRange(0), default=defaults.max_idle_per_address,
                  show_default=True, help="Most idle connections (awaiting headers, or kept alive) from one address; "
                  "more get 503. Requests in progress do not count. Behind a load balancer: above its idle pool, or 0.")
    @functools.wraps(command)
    def with_limits(*args, header_seconds, stall_seconds, keep_alive_seconds, max_connections, max_idle_per_address,
                    **kwargs):
        limits = ServerLimits(header_seconds, stall_seconds, keep_alive_seconds, max_connections, max_idle_per_address)
        return command(*args, limits=limits, **kwargs)
    return with_limits


def tls_options(command):
    """The serve commands' --tls-cert and --tls-key, shared by the registry and the FileService: the command
    is called with tls=an ssl.SSLContext (None for plain HTTP) in their place."""
    readable = click.Path(exists=True, dir_okay=False, readable=True)

    @click.option("--tls-cert", type=readable, help="Serve HTTPS with this certificate (PEM; the chain after it).")
    @click.option("--tls-key", type=readable, help="The certificate's private key (PEM).")
    @functools.wraps(command)
    def with_tls(*args, tls_cert, tls_key, **kwargs):
        if bool(tls_cert) != bool(tls_key):
            raise click.UsageError("give --tls-cert and --tls-key together, or neither for plain HTTP")
        return command(*args, tls=tls_context(tls_cert, tls_key) if tls_cert else None, **kwargs)
    return with_tls


def tls_context(certfile, keyfile):
    """A server's TLS context: TLS 1.2 or later, the certificate and key given. Raises click.UsageError,
    naming the file, when they do not load."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as error:
        raise click.UsageError(f"--tls-cert {certfile} and --tls-key {keyfile} do not load as a certificate "
                               f"and its key: {error}") from None
    return context


def serve_forever(app, host, port, limits=ServerLimits(), tls=None):
    """Serve app until the process ends; HTTPS when tls (an ssl.SSLContext) is given."""
    _allow_many_open_files()
    server = LimitedServer((host, port), app, _fitted_to_open_files(limits), log=None,
                           error_log=logging.getLogger("pht.wsgi"), backlog=LISTEN_BACKLOG,
                           **({"ssl_context": tls} if tls else {}))
    server.serve_forever()


def _allow_many_open_files():
    """Every waiting site holds a socket, every upload a file besides: a common default of 1024 open files
    would cap the sites. Raised to the hard limit, which only the machine's administrator may raise."""
    try:
        import resource
    except ImportError:  # Windows: no such per-process limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _fitted_to_open_files(limits):
    """A descriptor more than the open-file limit allows stops accept() (EMFILE): /health would hang
    instead of the extra connection getting its 503."""
    try:
        import resource
    except ImportError:  # Windows: no such per-process limit
        return limits
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or limits.max_connections <= connection_ceiling(soft):
        return limits
    log.warning("at most %d connections at once, not --max-connections %d: the open-file limit is %d and the "
                "process needs some files besides (raise the limit with `ulimit -n` or systemd's LimitNOFILE=)",
                connection_ceiling(soft), limits.max_connections, soft)
    return replace(limits, max_connections=connection_ceiling(soft))


class BodyStalled(RequestTimeout):
    """Raised into the application by a read of a request body that got no byte for --stall-seconds.
    It is werkzeug's 408, so Flask answers 408 Request Timeout and logs no server error."""


class _DropLog:
    """Counts the connections refused or closed for each reason, for the log: the first at once, then a
    summary at most every DROP_LOG_INTERVAL_SECONDS, at the next one."""

    def __init__(self):
        self._counts = collections.Counter()
        self._last_address = {}
        self._logged_at = -math.inf

    def record(self, verb, reason, address):
        self._counts[verb, reason] += 1
        self._last_address[verb, reason] = address
        now = time.monotonic()
        if now - self._logged_at < DROP_LOG_INTERVAL_SECONDS:
            return
        for key, count in self._counts.items():
            done, why = key
            log.warning("%s %d connection(s): %s; the last from %s", done, count, why, self._last_address[key])
        self._counts.clear()
        self._last_address.clear()
        self._logged_at = now


class _StallGuardedReader:
    """The connection's reader as a request body reads it: a read that waits longer than stall_seconds
    for its next byte raises BodyStalled. The timeout is the socket's, so it counts afresh at every
    receive: an upload that keeps moving goes on however long it takes."""

    def __init__(self, rfile, connection, stall_seconds):
        self._rfile = rfile
        self._connection = connection
        self._stall_seconds = stall_seconds
        self.stalled = False

    def read(self, size=-1):
        return self._within_stall(self._rfile.read, size)

    def readline(self, size=-1):
        return self._within_stall(self._rfile.readline, size)

    def _within_stall(self, read, size):
        self._connection.settimeout(self._stall_seconds)
        try:
            return read(size)
        except socket.timeout:
            self.stalled = True
            raise BodyStalled(f"no byte of the request body arrived for {self._stall_seconds:g} s") from None
        finally:
            self._connection.settimeout(None)


class _HeaderReader:
    """The connection's reader as gevent parses a request's headers: past MAX_HEADER_BYTES in all it raises
    LineTooLong, which gevent answers with 400."""

    def __init__(self, rfile):
        self._rfile = rfile
        self._left = MAX_HEADER_BYTES

    def readline(self, size=-1):
        line = self._rfile.readline(size)
        self._left -= len(line)
        if self._left < 0:
            raise http.client.LineTooLong(f"request headers over {MAX_HEADER_BYTES} bytes")
        return line


class _RequestBody(Input):
    """gevent's request body, read through a _StallGuardedReader. What the application leaves unread is
    read and dropped (a client still sending could not read the answer otherwise) for no longer than
    drain_seconds: a body trickled to an endpoint that never reads it must not hold the connection."""

    __slots__ = ("drain_seconds", "left_unread")

    def __init__(self, plain, reader, drain_seconds):
        super().__init__(reader, plain.content_length, socket=plain.socket, chunked_input=plain.chunked_input)
        self.drain_seconds = drain_seconds
        self.left_unread = False

    def _discard(self):
        deadline = Timeout.start_new(self.drain_seconds)
        try:
            super()._discard()
        except BodyStalled:
            self.left_unread = True
        except Timeout as timeout:
            if timeout is not deadline:
                raise
            self.left_unread = True
        finally:
            deadline.cancel()


class _LimitedHandler(WSGIHandler):
    """gevent's handler with the deadlines and the idle count of the module's docstring."""

    # A client that takes nothing of its answer for --stall-seconds is gone, as one that reset: close quietly.
    ignored_socket_errors = WSGIHandler.ignored_socket_errors + (errno.ETIMEDOUT,)

    _requests_begun = 0
    _headers_deadline = None
    _idle = True  # counted so by LimitedServer.do_handle, which admitted the connection

    def handle(self):
        try:
            super().handle()
        finally:
            self._count_as_idle(False)

    def read_requestline(self):
        limits = self.server.limits
        if self._requests_begun:
            if not self.server.may_keep_idle(self.client_address[0]):
                return ""  # closes the connection: its address holds all the idle ones it may
            self._count_as_idle(True)
            if not self._next_request_arrives(limits.keep_alive_seconds):
                return ""
        self._requests_begun += 1
        self._headers_deadline = Timeout.start_new(limits.header_seconds)
        return super().read_requestline()

    def log_request(self):
        pass  # the application logs each request (master/app.py); gevent's line would be formatted for nothing

    def MessageClass(self, rfile, *args):  # noqa: N802 (gevent's name): parses the headers
        return super().MessageClass(_HeaderReader(rfile), *args)

    def _next_request_arrives(self, seconds):
        """Wait up to seconds for the first byte of a kept-alive connection's next request."""
        with Timeout(seconds, False):
            return bool(self.rfile.peek(1))
        return False

    def handle_one_request(self):
        try:
            return super().handle_one_request()
        except Timeout as timeout:
            if timeout is not self._headers_deadline:
                raise
            self._record_drop(f"request line and headers not in within {self.server.limits.header_seconds:g} s"
                              f" (--header-seconds)")
            return None  # closes the connection
        finally:
            if self._headers_deadline is not None:
                self._headers_deadline.cancel()

    def get_environ(self):
        # The head is in: from here on the time is the application's (a long-poll waits for minutes).
        self._headers_deadline.cancel()
        self._count_as_idle(False)
        environ = super().get_environ()
        limits = self.server.limits
        # This server speaks no upgraded protocol (websockets), so every request's body, even one sent
        # with "Connection: upgrade", is read through the guarded reader.
        reader = _StallGuardedReader(self.rfile, self.socket, limits.stall_seconds)
        self.wsgi_input = environ["wsgi.input"] = _RequestBody(self.wsgi_input, reader, limits.header_seconds)
        environ["wsgi.input_terminated"] = True
        return environ

    def handle_one_response(self):
        super().handle_one_response()
        body = self.wsgi_input
        if body.rfile.stalled:
            self._record_drop(f"a request body that stalled for {self.server.limits.stall_seconds:g} s"
                              f" (--stall-seconds)")
            self.close_connection = True
        elif body.left_unread:
            self._record_drop(f"a body the application did not read was still coming after"
                              f" {self.server.limits.header_seconds:g} s (--header-seconds)")
            self.close_connection = True

    def _sendall(self, data):
        """gevent's sendall allows one timeout for a whole write, however large; here stall_seconds count
        from the last byte the client took, so a slow download that keeps moving goes on."""
        pending = memoryview(data)
        self.socket.settimeout(self.server.limits.stall_seconds)
        try:
            while pending:
                sent = self.socket.send(pending)
                self.response_length += sent
                pending = pending[sent:]
        except socket.timeout:
            self._record_drop(f"an answer the client took nothing of for {self.server.limits.stall_seconds:g} s"
                              f" (--stall-seconds)")
            raise OSError(errno.ETIMEDOUT, "the client took nothing of the answer") from None
        finally:
            self.socket.settimeout(None)

    def _count_as_idle(self, idle):
        if idle != self._idle:
            self._idle = idle
            self.server.count_idle(self.client_address[0], 1 if idle else -1)

    def _record_drop(self, reason):
        self.server.drops.record("closed", reason, self.client_address[0])


class LimitedServer(WSGIServer):
    """gevent's WSGI server with ServerLimits: caps on connections, checked as each one is accepted."""

    handler_class = _LimitedHandler

    def __init__(self, listener, application, limits, **options):
        super().__init__(listener, application, **options)
        self.limits = limits
        self.open_connections = 0
        self.idle_by_address = collections.Counter()  # address -> its connections with no request in progress
        self.drops = _DropLog()
        self._busy_answer = _busy_answer(retry_after_seconds=math.ceil(limits.header_seconds))

    def may_keep_idle(self, address):
        return not self.limits.max_idle_per_address or self.idle_by_address[address] < self.limits.max_idle_per_address

    def count_idle(self, address, change):
        self.idle_by_address[address] += change
        if not self.idle_by_address[address]:
            del self.idle_by_address[address]  # addresses come and go: keep only those holding idle connections

    def do_handle(self, client_socket, address):
        # The accept loop calls this for each new connection. A refusal is done here, at once and without
        # a greenlet, so that refused connections hold no descriptor while accepted ones pile up; and an
        # admitted one counts before its greenlet runs, so that a burst cannot overshoot the caps.
        reason = refusal_reason(self.limits, self.open_connections, self.idle_by_address[address[0]])
        if reason:
            self.drops.record("turned away", reason, address[0])
            _refuse(client_socket, self._busy_answer)
            client_socket.close()
            return
        self.open_connections += 1
        self.count_idle(address[0], 1)  # no request yet; the handler counts it from here
        try:
            super().do_handle(client_socket, address)
        except BaseException:  # no greenlet for it: the handler will never count it off
            self._count_off(address)
            raise

    def _count_off(self, address):
        """A connection admitted by do_handle that ends before its handler runs."""
        self.open_connections -= 1
        self.count_idle(address[0], -1)

    def wrap_socket_and_handle(self, client_socket, address):
        # gevent's TLS handshake comes before the handler, with no deadline of its own: a client that
        # stalls in it would hold the connection. It is part of the request's head, and has its deadline.
        try:
            with Timeout(self.limits.header_seconds):
                tls_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (Timeout, ssl.SSLError, OSError) as error:
            reason = (f"TLS handshake not done within {self.limits.header_seconds:g} s (--header-seconds)"
                      if isinstance(error, Timeout)
                      else f"TLS handshake failed ({getattr(error, 'reason', None) or type(error).__name__})")
            self.drops.record("closed", reason, address[0])
            client_socket.close()
            self._count_off(address)
            return None
        return self.handle(tls_socket, address)

    def handle(self, client_socket, address):
        try:
            # The server writes a response's headers and body separately; with Nagle's algorithm on,
            # the body then waits for the client's delayed ACK: 40 ms added to every request.
            client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(client_socket, address)
        finally:
            self.open_connections -= 1


def _busy_answer(retry_after_seconds):
    """The 503 for a refused connection. Retry after the header deadline: by then every connection that
    was waiting for its headers has sent them or been closed."""
    body = json.dumps({"message": "the server has as many connections as it takes; try again shortly",
                       "detail": {}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after_seconds}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


def _refuse(connection, answer):
    """Send the 503, never waiting on the client: a new connection's send buffer takes the few bytes at once."""
    connection.settimeout(0)
    try:
        connection.send(answer)
        # What the client has sent already: left unread, the close would reset the connection, and
        # the client might lose the answer with it.
        connection.recv(65536)
    except OSError:
        pass
