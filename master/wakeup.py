"""Wakes the sites' long-poll requests when work arrives for them.

A waiting request holds neither a database connection nor a thread: under the
gevent server it is a parked greenlet on this condition (the threading module is
monkey-patched there). Each site has a generation number that grows whenever it
gets new work; a waiter remembers the number it saw before it last looked in the
database, so work announced between that look and the wait is never missed.
"""

import collections
import threading


class WorkAnnouncements:
    def __init__(self):
        self._changed = threading.Condition()
        self._generation = collections.Counter()

    def generation(self, site_id):
        with self._changed:
            return self._generation[site_id]

    def announce(self, site_ids):
        if not site_ids:
            return
        with self._changed:
            for site_id in site_ids:
                self._generation[site_id] += 1
            self._changed.notify_all()

    def wait_for_news(self, site_id, seen_generation, timeout):
        """True as soon as the site's generation moves past seen_generation; False after timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._generation[site_id] != seen_generation, timeout)
