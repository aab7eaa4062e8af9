"""Wakes long-poll requests: a site's when work arrives for it, a researcher's when a task ends.

A waiting request holds neither a database connection nor a thread: under the
gevent server it is a parked greenlet on its key's condition (the threading
module is monkey-patched there). Each key (a site id, a task id) has a generation
number that grows with every announcement; a waiter remembers the number it saw
before it last looked in the database, so news announced between that look and
the wait is never missed. Only the waiters of the announced keys are woken.
"""

import collections
import threading


class Announcements:
    def __init__(self):
        self._lock = threading.Lock()
        self._generation = collections.Counter()
        self._changed = collections.defaultdict(lambda: threading.Condition(self._lock))

    def generation(self, key):
        with self._lock:
            return self._generation[key]

    def announce(self, keys):
        with self._lock:
            for key in keys:
                self._generation[key] += 1
                self._changed[key].notify_all()

    def wait_for_news(self, key, seen_generation, timeout):
        """True as soon as the key's generation moves past seen_generation; False after timeout."""
        with self._lock:
            return self._changed[key].wait_for(lambda: self._generation[key] != seen_generation, timeout)
