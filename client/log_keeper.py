"""An algorithm's log as the run keeps it: its beginning and its end, and a line saying what was dropped.

Docker's json-file driver keeps at most containers.MAX_LOG_BYTES of a container's output and, when it
rotates, keeps the end: the lines that say what the algorithm set out to do would be lost in a flood.
So the runner attaches to the container's output before it starts (LogFollower, a thread per run),
keeps the first HEAD_BYTES and the last TAIL_BYTES, and counts the rest:

    <the first HEAD_BYTES>
    [site runner] 1996488704 bytes of the log dropped here (it kept the first 10485760 and the last 10485760)
    <the last TAIL_BYTES>

Memory stays within HEAD_BYTES + TAIL_BYTES + one piece, however much the algorithm prints. Attached,
the runner reads the output as the container writes it, bytes as they are (following Docker's stored
log instead loses what a rotation removes before it is read, and turns bytes that are not UTF-8 into
U+FFFD). A runner restarted while a container runs attaches again and first gets what Docker still
holds of the log: then the beginning may be gone, and the count is of what the runner saw.
"""

import logging
import threading

import docker
import requests

from client import containers

log = logging.getLogger("pht.runner")

HEAD_BYTES = 10 * 1024 ** 2
TAIL_BYTES = 10 * 1024 ** 2
NOTE = "[site runner] "  # how the runner's own lines start; the researcher tools tell them apart by it
FOLLOWING_ERRORS = (docker.errors.DockerException, requests.RequestException, OSError, ValueError)


class HeadAndTail:
    """The first head_bytes and the last tail_bytes of a stream fed piece by piece (pure)."""

    def __init__(self, head_bytes=HEAD_BYTES, tail_bytes=TAIL_BYTES):
        self.head_bytes, self.tail_bytes = head_bytes, tail_bytes
        self.head = bytearray()
        # One buffer, trimmed back to tail_bytes once it holds twice that: a log written a byte at a time
        # costs no more memory than one written in large pieces.
        self._tail = bytearray()
        self.seen = 0

    def feed(self, piece):
        self.seen += len(piece)
        room = self.head_bytes - len(self.head)
        if room > 0:
            self.head += piece[:room]
            piece = piece[room:]
        self._tail += piece
        if len(self._tail) > 2 * self.tail_bytes:
            del self._tail[:-self.tail_bytes]

    @property
    def tail(self):
        return self._tail[-self.tail_bytes:] if self.tail_bytes else b""

    @property
    def kept(self):
        return len(self.head) + len(self.tail)

    @property
    def dropped(self):
        return self.seen - self.kept

    def write_to(self, path, trouble=None):
        """Write the kept log; trouble: why it may be incomplete, said in a line of its own at the end."""
        with open(path, "wb") as out:
            out.write(self.head)
            if self.dropped:
                out.write(f"\n{NOTE}{self.dropped} bytes of the log dropped here (it kept the first "
                          f"{len(self.head)} and the last {len(self.tail)})\n".encode())
            out.write(self.tail)
            if trouble:
                out.write(f"\n{NOTE}{trouble}\n".encode())


class LogFollower:
    """Reads one container's output on a thread, attached from before the container starts until it ends."""

    def __init__(self, container, path, head_bytes=HEAD_BYTES, tail_bytes=TAIL_BYTES):
        self.container, self.path = container, path
        self.keeper = HeadAndTail(head_bytes, tail_bytes)
        self._stream = None
        self._trouble = None
        self._keeping = threading.Lock()  # a reader that outlived finish() must not feed while it writes
        self._thread = threading.Thread(target=self._read, name=f"log-{container.short_id}", daemon=True)

    def start(self, just_created=False):
        """Attach (call it before the container starts, so no byte comes before), then read on a thread.
        just_created: the container was created a moment ago, and nothing has started it since; else its state is
        asked first (attached to a container that has ended, the stream would never end)."""
        try:
            if not just_created:
                self.container.reload()
            if containers.has_not_ended(self.container):
                self._stream = self.container.attach(stdout=True, stderr=True, stream=True, logs=True)
            else:  # it ended while the runner was not running: attached, the stream would never end
                self._stream = self.container.logs(stdout=True, stderr=True, stream=True, follow=False)
        except FOLLOWING_ERRORS as error:
            self._broke(error)
        self._thread.start()
        return self

    def finish(self, timeout_seconds=60):
        """Once the container has ended: wait for the output's end, then write what was kept."""
        self._thread.join(timeout_seconds)
        if self._thread.is_alive():  # the engine did not end the stream: take what came
            self._trouble = f"the log was cut off: its end did not come within {timeout_seconds} s of the container's"
            self._close_stream()
            self._thread.join(5)
        with self._keeping:
            self.keeper.write_to(self.path, self._trouble)

    def _read(self):
        if self._stream is None:
            return
        try:
            for piece in self._stream:
                with self._keeping:
                    self.keeper.feed(piece)
        except FOLLOWING_ERRORS as error:
            self._broke(error)

    def _broke(self, error):
        if self._trouble is None:
            log.warning("reading the output of container %s broke: %s", self.container.short_id, error)
            self._trouble = f"reading the log broke ({type(error).__name__}): what came after is missing"

    def _close_stream(self):
        try:
            self._stream.close()
        except Exception as error:  # noqa: BLE001 - closing a broken stream may fail in any way; it is over anyway
            log.debug("closing the log stream: %s", error)
