"""When each site was last written down as seen.

Every claim says the site is alive, and an idle site renews its long-poll every half minute or so: writing
last_seen_at for each renewal would make an idle consortium of a thousand sites a steady stream of database
writes. A sighting is written when what the site reports (runner version, SPARQL answering) changed, or when
the last one this process wrote is older than the refresh interval. A site counts as online while its
last_seen_at is within the online window, so a refresh of half that window keeps a polling site online and
lets a silent one go offline at most one window after its last written sighting.
"""

import threading
import time


class Sightings:
    def __init__(self, refresh_seconds, clock=time.time):
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._written = {}  # site id -> (when written, what the site reported then)

    def due(self, site_id, report):
        """True when this sighting should be written: the report changed, or the last write is too old."""
        with self._lock:
            last = self._written.get(site_id)
        return last is None or last[1] != report or self._clock() - last[0] >= self.refresh_seconds

    def written(self, site_id, report, at):
        with self._lock:
            self._written[site_id] = (at, report)
