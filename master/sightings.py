"""When each site was last written down as seen.

Every claim says the site is alive, and an idle site renews its long-poll every half minute or so: writing
last_seen_at for each renewal would make an idle consortium of a thousand sites a steady stream of database
writes. A sighting is written when what the site reports (runner version, SPARQL answering) changed, or when
the last one this process wrote is older than the refresh interval. A site counts as online while its
last_seen_at is within the online window, so a refresh of half that window keeps a polling site online and
lets a silent one go offline at most one window after its last written sighting.

A sighting due is noted here, and written with the others noted since in one transaction (Registry.write_sightings):
a thousand sites whose first claims arrive together then cost a few commits, not a thousand.
"""

import threading
import time


class Sightings:
    def __init__(self, refresh_seconds, clock=time.time):
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._written = {}  # site id -> (when written, what the site reported then)
        self._unwritten = {}  # site id -> (what the site reported, when): noted, not yet in the database

    def due(self, site_id, report):
        """True when this sighting should be written: the report changed, or the last write is too old."""
        with self._lock:
            last = self._written.get(site_id)
        return last is None or last[1] != report or self._clock() - last[0] >= self.refresh_seconds

    def note(self, site_id, report, at):
        """The sighting is to be written (take_unwritten), and counts as written from now on."""
        with self._lock:
            self._written[site_id] = (at, report)
            self._unwritten[site_id] = (report, at)

    def take_unwritten(self):
        """{site id: (report, when)} of the sightings noted since the last call, for the caller to write."""
        with self._lock:
            taken, self._unwritten = self._unwritten, {}
        return taken

    def give_back(self, unwritten):
        """Sightings whose write failed, to write with the next ones; a newer one for the same site wins."""
        with self._lock:
            self._unwritten = {**unwritten, **self._unwritten}
