"""Live updates: a page's long-poll answers once what the page shows has changed.

A page carries a fingerprint of what it shows; its script (static/live.js) asks /ui/live/… with it, and the
answer comes when the fingerprint differs or after WAIT_SECONDS. The script then fetches the page again and
puts its new <main> in place, so every state is rendered, and escaped, by the same template.

What wakes a waiting answer: the registry's own wake-ups for tasks (registry.ended_tasks: a run ended, or
waits for a person at its site), so an ended run shows at once. Other changes (a claim, a start, a site's
sighting, a site going offline, which is no event at all) are found by looking again every
recheck_seconds (wakeup.RECHECK_SECONDS unless the app's DASHBOARD_RECHECK_SECONDS says otherwise; the app's
DASHBOARD_WAIT_SECONDS likewise replaces WAIT_SECONDS).
"""

import hashlib
import json
import re
import time

from master import lifecycle

WAIT_SECONDS = 25  # within every proxy's idle timeout, and the server's --stall-seconds
FINGERPRINT = re.compile(r"[0-9a-f]{0,64}")  # what a page may send as "since"; empty: answer at once

_RUN_FACTS = ("id", "status", "reason", "attempts", "updated_at", "output_sha256", "log_sha256", "exit_code")
_SITE_FACTS = ("name", "online", "sparql_ok", "runner_version", "last_seen_at", "active_runs", "revoked_at")


def _digest(facts):
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def tasks_fingerprint(tasks, total=None):
    """Pure: what a page of tasks shows, as one value: their ids, and each run's state and results."""
    return _digest([total, [[task["id"], [[run.get(fact) for fact in _RUN_FACTS] for run in task["runs"]]]
                            for task in tasks]])


def sites_fingerprint(sites):
    """Pure: what a page of sites shows (online is computed with the time of the look)."""
    return _digest([[site.get(fact) for fact in _SITE_FACTS] for site in sites])


def news_key(tasks):
    """Pure: the task whose runs' news wakes the wait: the newest one still active (a session's rounds run one
    after another), or None."""
    active = [task["id"] for task in tasks if task["status"] == lifecycle.TaskStatus.ACTIVE]
    return max(active, default=None)


def answer_when_changed(look, since, announcements, recheck_seconds, wait_seconds=WAIT_SECONDS):
    """The fingerprint from look() once it differs from since, or after wait_seconds.

    look() returns (fingerprint, news key or None). With a key, the wait also ends at news for it."""
    deadline = time.monotonic() + wait_seconds
    key = seen = None
    while True:
        fingerprint, looked_key = look()
        remaining = deadline - time.monotonic()
        if fingerprint != since or remaining <= 0:
            return fingerprint
        if looked_key != key:
            # A key's generation guards only the looks made after it was read: read it, then look once more.
            key = looked_key
            seen = None if key is None else announcements.generation(key)
            continue
        pause = min(remaining, recheck_seconds)
        if key is None:
            time.sleep(pause)
        else:
            announcements.wait_for_news(key, seen, pause)
            seen = announcements.generation(key)
