"""SPARQL relays kept between the runs of one session, as the session's /temp is.

Starting a relay (a container with a network namespace of its own, then its Python) costs more than starting the
algorithm that joins it: ~0.27 s against ~0.1 s on an idle machine, and on a busy one the cores it takes are the
algorithm's. An iterative analysis sends one run per round to each site, all of one session; so a relay whose run
has ended is kept for the session's next run here instead of removed, and that run starts only its algorithm.

What a kept relay could carry from one run to the next, were an algorithm to subvert it, crosses no line the
session's /temp does not cross already: the relay is used by runs of its session only, by one at a time, and once
its run's algorithm container is removed (nothing of that run is left in the namespace), and only one that was
seen listening; it is removed when the session's /temp is (closed, idle or beyond max_sessions:
session_folders.py), and not kept if that went first (a run held for review outlives its session's /temp), after
KEEP_SECONDS unused, or when more than the site's max_concurrent_runs are kept (the least recently used goes).

A kept relay's socket folder moves with it: from its run's gateway folder to relays/ in the work_dir, then to the
next run's gateway folder (the relay's bind mount is of the folder, not of its path). The pool is in memory only:
after a restart, no run records a kept relay, so it is removed as unrecorded (SiteRunner.remove_unrecorded_containers)
and its folder with the rest of relays/ (remove_left_over).
"""

import collections
import logging
import os
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
import requests

from client import containers

log = logging.getLogger("pht.runner")

KEEP_SECONDS = 15 * 60  # longer than the pause between two rounds of an analysis that is still going on
RETURN_WAIT_SECONDS = 30  # a container's removal takes milliseconds; an engine that hangs longer is not waited for
ENGINE_PROBLEMS = (docker.errors.DockerException, requests.RequestException)


@dataclass(frozen=True)
class KeptRelay:
    session_id: int
    container_id: str
    folder: Path  # its socket folder while no run has it
    kept_at: float


class RelayPool:
    def __init__(self, engine, folder, max_kept, clock=time.time, return_wait_seconds=RETURN_WAIT_SECONDS):
        """folder: where kept relays' socket folders wait, on the runs' filesystem (they move by renaming)."""
        self.engine, self.folder, self.max_kept, self._clock = engine, Path(folder), max_kept, clock
        self.return_wait_seconds = return_wait_seconds
        self._kept = {}  # session id -> KeptRelay
        self._lock = threading.Lock()
        self._returning = collections.Counter()  # session id -> its runs removing their containers (returning)
        self._returned = threading.Condition(self._lock)
        self._closed = False  # the runner stops: a relay whose run ends now is removed, not kept

    def remove_left_over(self):
        """The socket folders an earlier runner kept (their relays were removed as unrecorded)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @contextmanager
    def returning(self, session_id):
        """Around a run's removal of its container and keep (or removal) of its relay: a take for the session waits
        for it meanwhile (at most return_wait_seconds), so that the session's next run can be claimed before the
        removal is done and still joins the relay."""
        with self._lock:
            self._returning[session_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._returning[session_id] -= 1
                if not self._returning[session_id]:
                    del self._returning[session_id]
                self._returned.notify_all()

    def take(self, session_id, socket_dir):
        """The container id of the relay kept for the session, once its socket folder is socket_dir (which must
        not exist, or be empty); None if none is kept, or it stopped meanwhile (the run starts a relay of its own)."""
        with self._lock:
            self._returned.wait_for(lambda: not self._returning[session_id], self.return_wait_seconds)
            relay = self._kept.pop(session_id, None)
        if relay is None:
            return None
        try:
            if not containers.is_running(self.engine, relay.container_id):
                raise OSError("it stopped meanwhile")
            os.rename(relay.folder, socket_dir)
        except (OSError, *ENGINE_PROBLEMS) as error:
            log.warning("session %s: its kept SPARQL relay %s cannot be used (%s); the run starts one of its own",
                        session_id, relay.container_id[:12], error)
            self._remove([relay])
            return None
        return relay.container_id

    def keep(self, session_id, container_id, socket_dir):
        """Keep the relay of a run of the session that has ended (its algorithm's container removed, its gateway
        closed), with its socket folder socket_dir; removed instead if that folder cannot be moved."""
        folder = self.folder / f"{session_id}-{secrets.token_hex(4)}"
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            os.rename(socket_dir, folder)
        except OSError as error:
            log.warning("session %s: its SPARQL relay %s is not kept (%s)", session_id, container_id[:12], error)
            self._remove([KeptRelay(session_id, container_id, socket_dir, 0)])
            return
        with self._lock:
            unkept = [relay for relay in [self._kept.pop(session_id, None)] if relay]
            self._kept[session_id] = KeptRelay(session_id, container_id, folder, self._clock())
            if self._closed:
                unkept.append(self._kept.pop(session_id))
            while len(self._kept) > self.max_kept:
                unkept.append(self._kept.pop(min(self._kept, key=lambda kept: self._kept[kept].kept_at)))
        self._remove(unkept)

    def remove_unused(self, ended_sessions=()):
        """Remove the relays of sessions whose /temp was removed, and those unused for KEEP_SECONDS."""
        now = self._clock()
        with self._lock:
            unkept = [self._kept.pop(session_id) for session_id, relay in list(self._kept.items())
                      if session_id in ended_sessions or now - relay.kept_at > KEEP_SECONDS]
        self._remove(unkept)

    def close(self):
        """Remove every kept relay (the runner stops)."""
        with self._lock:
            unkept, self._kept, self._closed = list(self._kept.values()), {}, True
        self._remove(unkept)

    def _remove(self, relays):
        for relay in relays:
            try:
                containers.remove(self.engine, relay.container_id)
            except ENGINE_PROBLEMS as error:  # the engine is away: the next start removes it as unrecorded
                log.warning("SPARQL relay %s was not removed: %s", relay.container_id[:12], error)
            shutil.rmtree(relay.folder, ignore_errors=True)
