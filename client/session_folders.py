"""Each session's /temp at this site: made for its first run, kept between rounds, removed when done.

    work_dir/sessions/<session id>/temp/       bound at /temp for every run of the session
                                  /disk.img    its filesystem of fixed size, mounted at temp/ (disk_limits.py)
                                  /last-used   touched when a run of the session starts and when it ends

A session's folder is removed when the researcher has closed the session (the registry
says so when asked, before a claim), when no run has used it for session_idle_seconds, or
when more than max_sessions are held (the least recently used go first), and never while a
run of the session is under way here. A registry that lies about a
session being closed can make the site forget that session's /temp early, which costs
the researcher their intermediate state, not the site anything.
"""

import logging
import threading
from pathlib import Path

from client import disk_limits

log = logging.getLogger("pht.runner")

LAST_USED = "last-used"


class SessionFolders:
    def __init__(self, sessions_dir, temp_size):
        """temp_size: a disk_limits.DiskSize for a filesystem per session, or None for plain folders."""
        self.sessions_dir = Path(sessions_dir)
        self.temp_size = temp_size
        self._lock = threading.Lock()  # two runs of one session may start at once

    def temp_for(self, session_id):
        """The session's /temp, ready to bind (made or mounted again as needed). Raises disk_limits.DiskProblem."""
        folder = self.sessions_dir / str(session_id)
        with self._lock:
            folder.mkdir(parents=True, exist_ok=True)
            if self.temp_size:
                disk_limits.mount(folder / disk_limits.IMAGE_NAME, folder / "temp", self.temp_size)
            else:
                (folder / "temp").mkdir(exist_ok=True)
            self.mark_used(session_id)
        return folder / "temp"

    def mark_used(self, session_id):
        last_used = self.sessions_dir / str(session_id) / LAST_USED
        if last_used.parent.is_dir():
            last_used.touch()

    def holds(self, session_id):
        """Whether the session's folder is here."""
        return (self.sessions_dir / str(session_id)).is_dir()

    def held(self):
        """Session id -> when a run last used its folder, for every session folder here."""
        held = {}
        for path in self.sessions_dir.glob("*") if self.sessions_dir.is_dir() else ():
            if path.name.isdigit() and path.is_dir() and not path.is_symlink():
                try:
                    held[int(path.name)] = (path / LAST_USED).stat().st_mtime
                except FileNotFoundError:  # made by a runner stopped before it touched it
                    held[int(path.name)] = path.stat().st_mtime
        return held

    def remove(self, session_id, why):
        with self._lock:
            try:
                disk_limits.remove_folder(self.sessions_dir / str(session_id))
            except disk_limits.DiskProblem as error:
                log.warning("session %s: its /temp is still in use (%s); removed later", session_id, error)
                return
        log.info("session %s: removed its /temp (%s)", session_id, why)


def sessions_to_remove(held, active, closed, now, idle_seconds, max_sessions):
    """{session id: why} for the folders to remove: closed or idle, or beyond the max_sessions used most recently,
    and without a run under way here (pure). The last bounds the disk a registry that opens a new session for
    every run could make the site fill with /temp folders."""
    removable = {}
    for session_id, last_used in held.items():
        if session_id in active:
            continue
        if session_id in closed:
            removable[session_id] = "the researcher closed the session"
        elif now - last_used > idle_seconds:
            removable[session_id] = f"no run used it for {idle_seconds} s (session_idle_seconds)"
    kept = sorted((session_id for session_id in held if session_id not in removable),
                  key=lambda session_id: (session_id in active, held[session_id]), reverse=True)
    for session_id in kept[max_sessions:]:
        if session_id not in active:
            removable[session_id] = (f"this site keeps the /temp of {max_sessions} sessions (max_sessions), and "
                                     "this one was used least recently")
    return removable

