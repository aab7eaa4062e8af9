"""Wakes long-poll requests: a site's when work arrives for it, a researcher's when a task ends.

A waiting request holds neither a database connection nor a thread: under the
gevent server it is a parked greenlet on its key's condition (the threading
module is monkey-patched there). Each key (a site id, a task id) has a generation
number that grows with every announcement; a waiter remembers the number it saw
before it last looked in the database, so news announced between that look and
the wait is never missed. Only the waiters of the announced keys are woken.

Replicas of the registry on one PostgreSQL database hear each other's news through it
(PostgresRelay): every announcement is also a NOTIFY on its channel, and each replica
LISTENs, so a task posted through one replica wakes the sites waiting on another. On
SQLite there is one process, and nothing to relay.
"""

import collections
import logging
import re
import threading
import uuid

import psycopg
import sqlalchemy as sa

log = logging.getLogger("pht.registry")

# A wait for a task looks in the database again this often: a task's runs may also end by an operator's command
# (revoke), which runs in a process of its own. A waiting claim does so only while news from other replicas
# (PostgresRelay) does not arrive.
RECHECK_SECONDS = 5
# A NOTIFY payload must stay under 8,000 bytes: more keys go in several.
MAX_PAYLOAD_CHARS = 7000
RELISTEN_SECONDS = (1, 2, 5, 10, 30)  # backing off while the database does not answer
# What a replica sends: its id, then ids (positive, 32-bit). Anyone who may connect to the database may
# NOTIFY: a payload of any other shape is ignored.
PAYLOAD = re.compile(r"(?P<replica>[0-9a-f]{12}) (?P<keys>[0-9]{1,10}(?:,[0-9]{1,10})*)")
LARGEST_KEY = 2 ** 31 - 1
# The listening connection's TCP keepalives: a connection cut without a word (a failover, a partition)
# is noticed within about a minute, and connected again.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
              "connect_timeout": 10}


class Announcements:
    def __init__(self, channel):
        self.channel = channel  # its name among the replicas (PostgresRelay)
        self._lock = threading.Lock()
        self._generation = collections.Counter()
        self._changed = collections.defaultdict(lambda: threading.Condition(self._lock))
        self.relay = None  # set by PostgresRelay: where announcements also go

    def generation(self, key):
        with self._lock:
            return self._generation[key]

    def announce(self, keys):
        """News for keys: wake their waiters here, and on the other replicas."""
        keys = list(keys)
        self.hear(keys)
        if self.relay is not None and keys:
            self.relay.publish(self.channel, keys)

    def hear(self, keys):
        """News for keys (or, with None, for every key someone waits on): wake their waiters here only."""
        with self._lock:
            for key in list(self._changed) if keys is None else keys:
                self._generation[key] += 1
                self._changed[key].notify_all()

    def wait_for_news(self, key, seen_generation, timeout):
        """True as soon as the key's generation moves past seen_generation; False after timeout."""
        with self._lock:
            return self._changed[key].wait_for(lambda: self._generation[key] != seen_generation, timeout)


class PostgresRelay:
    """Announcements shared by the registry's replicas through PostgreSQL's NOTIFY and LISTEN.

    publish() NOTIFYs from the engine's pool; listen() holds one connection of its own, outside the pool,
    for as long as the replica runs. A replica ignores its own notifications (it woke its waiters when it
    announced), so each carries the replica's id. While the listening connection is lost, news from other
    replicas is missed: once it is back, every waiter here is woken to look in the database again.
    """

    def __init__(self, engine, announcements):
        self._engine = engine
        self._by_channel = {each.channel: each for each in announcements}
        self.replica = uuid.uuid4().hex[:12]
        self.listening = threading.Event()  # set while listen() hears the other replicas
        for each in announcements:
            each.relay = self

    def publish(self, channel, keys):
        try:
            with self._engine.begin() as conn:
                for payload in payloads(self.replica, keys):
                    conn.execute(sa.text("SELECT pg_notify(:channel, :payload)"),
                                 {"channel": channel, "payload": payload})
        # The waiters here are woken. The other replicas' sites find the news at their next claim (within a
        # long-poll's wait), their researchers' waits within RECHECK_SECONDS.
        except sa.exc.SQLAlchemyError as error:
            log.warning("could not tell the other replicas of news on %s: %s", channel, error)

    def listen(self, stop):
        """Hear the other replicas until stop is set (run it in a thread: a greenlet under gevent)."""
        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        failures = 0
        while not stop.is_set():
            try:
                with psycopg.connect(conninfo, autocommit=True, **KEEPALIVES) as conn:
                    for channel in self._by_channel:
                        conn.execute(f"LISTEN {channel}")
                    if failures:
                        log.info("listening to the other replicas again")
                    failures = 0
                    self.listening.set()
                    self._hear_all()  # whatever was missed before this connection listened
                    while not stop.is_set():
                        for notification in conn.notifies(timeout=1.0):
                            self._hear(notification.channel, notification.payload)
            except Exception as error:  # whatever it was, this replica must go on listening
                self.listening.clear()
                delay = RELISTEN_SECONDS[min(failures, len(RELISTEN_SECONDS) - 1)]
                failures += 1
                log.warning("not listening to the other replicas (%s); trying again in %s s", error, delay)
                stop.wait(delay)

    def _hear(self, channel, payload):
        keys = keys_from(payload, self.replica)
        if keys and channel in self._by_channel:
            self._by_channel[channel].hear(keys)

    def _hear_all(self):
        for each in self._by_channel.values():
            each.hear(None)


def keys_from(payload, own_replica):
    """Pure: the keys another replica's payload names; [] for this replica's own, or for a payload that is
    not one a replica sends."""
    sent = PAYLOAD.fullmatch(payload)
    if sent is None or sent["replica"] == own_replica:
        return []
    return [key for key in map(int, sent["keys"].split(",")) if 0 < key <= LARGEST_KEY]


def payloads(replica, keys):
    """Pure: "<replica> <key>,<key>,…" payloads that together name every key, each under MAX_PAYLOAD_CHARS."""
    batch, length = [], len(replica) + 1
    for key in map(str, keys):
        if batch and length + len(key) + 1 > MAX_PAYLOAD_CHARS:
            yield f"{replica} {','.join(batch)}"
            batch, length = [], len(replica) + 1
        batch.append(key)
        length += len(key) + 1
    if batch:
        yield f"{replica} {','.join(batch)}"
