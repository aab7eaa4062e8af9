"""A port on loopback that forwards to another, and that a test turns off and on: a peer that goes away."""

import socket
import threading

from scripts.federation import free_port


class Switch:
    """A port on loopback that forwards to another (a fake registry's, an object store's), and that a test turns off
    (connections refused, those open cut) and on again, on the same port: a peer that goes away and comes back."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._sockets = []  # both ends of every forwarded connection, cut when the switch is turned off
        self._lock = threading.Lock()
        self._off = threading.Event()
        self.turn_on()

    def turn_on(self):
        self._off.clear()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._accepting = threading.Thread(target=self._accept, args=(self._listener,), daemon=True)
        self._accepting.start()

    def turn_off(self):
        self._off.set()
        self._accepting.join()
        self._listener.close()
        with self._lock:
            for connection in self._sockets:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._sockets.clear()

    def _accept(self, listener):
        while not self._off.is_set():
            try:
                client = listener.accept()[0]
            except TimeoutError:
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut by turn_off, or by either end
