"""Wakes the sites' long-poll requests when work arrives for them.

A waiting request holds neither a database connection nor a thread: under the
gevent server it is a parked greenlet on its site's condition (the threading
module is monkey-patched there). Each site has a generation number that grows
whenever it gets new work; a waiter remembers the number it saw before it last
looked in the database, so work announced between that look and the wait is
never missed. Only the waiters of the sites that got work are woken.
"""

import collections
import threading


class WorkAnnouncements:
    def __init__(self):
        self._lock = threading.Lock()
        self._generation = collections.Counter()
        self._site_changed = collections.defaultdict(lambda: threading.Condition(self._lock))

    def generation(self, site_id):
        with self._lock:
            return self._generation[site_id]

    def announce(self, site_ids):
        with self._lock:
            for site_id in site_ids:
                self._generation[site_id] += 1
                self._site_changed[site_id].notify_all()

    def wait_for_news(self, site_id, seen_generation, timeout):
        """True as soon as the site's generation moves past seen_generation; False after timeout."""
        with self._lock:
            return self._site_changed[site_id].wait_for(
                lambda: self._generation[site_id] != seen_generation, timeout)
