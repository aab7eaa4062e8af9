"""rdflib's SPARQL parser in worker processes, each query with a hard time limit.

Some valid queries take rdflib tens of seconds to parse (long chains of || or +, thousands
of UNIONs), and a parse cannot be interrupted in a thread. So the gateway parses in a few
worker processes: a query not read within PARSE_SECONDS is refused and its worker killed
and replaced. Each run's gateway sends one query at a time (sparql_gateway.py), so a run
that sends slow queries holds at most one worker, never all of them. Workers are started
with the runner and say when they are ready, so a worker's start never counts against a
query's time.
"""

import logging
import multiprocessing
import queue
import sys
import threading

from client.sparql_queries import parsed_verdict, refused

log = logging.getLogger("pht.runner")

PARSE_SECONDS = 5
WORKERS = 2
START_SECONDS = 120  # importing rdflib on a busy machine
# rdflib's grammar recurses once per triple pattern and nesting level: a plain query of a hundred
# patterns passes Python's default limit of 1,000. Room for far more, on a thread with a stack to match.
RECURSION_LIMIT = 50_000
PARSER_STACK_BYTES = 512 * 1024 ** 2

class ParserPool:
    def __init__(self, workers=WORKERS, parse_seconds=PARSE_SECONDS):
        self.parse_seconds = parse_seconds
        # spawn: the runner has threads, and forking a process with threads can copy a held lock.
        self._context = multiprocessing.get_context("spawn")
        self._idle = queue.Queue()
        self._workers = workers

    def start(self):
        """Start the workers (at once, side by side) and wait until each is ready."""
        starting = [self._spawn() for _ in range(self._workers)]
        for worker in starting:
            self._idle.put(self._ready(worker))

    def judge(self, text):
        """(form, None) or (None, Refusal), as sparql_queries.parsed_verdict, within parse_seconds."""
        worker = self._idle.get()
        process, connection = worker
        try:
            connection.send(text)
            if connection.poll(self.parse_seconds):
                verdict = connection.recv()
                self._idle.put(worker)
                return verdict
        except (EOFError, OSError):
            pass  # the worker died (out of memory, say): replaced below
        process.kill()
        process.join()
        self._idle.put(self._ready(self._spawn()))
        log.info("a SPARQL query took the parser longer than %s s; its worker was replaced", self.parse_seconds)
        return None, refused(400, f"reading the query took longer than this site allows ({self.parse_seconds} s); "
                                  "make it shorter or simpler (fewer nested or chained expressions)")

    def close(self):
        while True:
            try:
                process, _connection = self._idle.get_nowait()
            except queue.Empty:
                return
            process.kill()
            process.join()

    def _spawn(self):
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(theirs,), name="sparql-parser", daemon=True)
        process.start()
        theirs.close()
        return process, ours

    @staticmethod
    def _ready(worker):
        process, connection = worker
        if not connection.poll(START_SECONDS) or connection.recv() != READY:
            raise RuntimeError(f"a SPARQL parser process did not start within {START_SECONDS} s")
        return worker


READY = "ready"


def _serve(connection):
    """A worker process: parse on a thread with a deep stack (see RECURSION_LIMIT)."""
    sys.setrecursionlimit(RECURSION_LIMIT)
    threading.stack_size(PARSER_STACK_BYTES)
    parser = threading.Thread(target=_parse_each, args=(connection,), name="parse")
    parser.start()
    parser.join()


def _parse_each(connection):
    """Say it is ready, then parse each query it is sent and answer its verdict."""
    parsed_verdict("ASK {}")  # the grammar's first use is the slow one
    connection.send(READY)
    while True:
        try:
            text = connection.recv()
        except EOFError:
            return
        connection.send(parsed_verdict(text))
