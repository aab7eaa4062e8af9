"""Who holds a token, remembered between requests, and forgotten as soon as any token is revoked or replaced.

Every request names its token, and looking it up costs a query per role: more than the rest of a parked claim. So
the holders found are kept here, and the whole cache is dropped whenever a token changes anywhere:
- on SQLite, store.revoke_principal and store.replace_token rewrite a stamp file beside the database once they
  have committed (the operator's commands run in a process of their own); every look-up reads the stamp, a few
  microseconds, and drops the cache when it changed;
- on PostgreSQL they NOTIFY in their own transaction, which every replica's relay hears (master/wakeup.py); a
  replica whose relay is not listening keeps nothing, and looks every token up.
Only holders are kept: an unknown token is looked up each time, so one created meanwhile is found at once.
"""

import threading

from master import store

# More holders than a consortium has: past it the cache starts again, rather than grow.
MAX_HOLDERS = 100_000


class TokenCache:
    channel = store.TOKENS_CHANGED_CHANNEL  # what PostgresRelay listens to for it

    def __init__(self, engine):
        self._engine = engine
        self._stamp_path = store.tokens_stamp_path(engine)  # None: changes come through the relay, if any
        self._stamp = None
        self._lock = threading.Lock()
        self._holders = {}
        self._generation = 0  # grows with every drop: a look-up begun before one does not keep what it found
        self.relay = None  # set by PostgresRelay

    def find(self, token_hash):
        """(role, id, name) of the holder of the token if it is not revoked, else None (store.find_principal)."""
        generation = self._trusted_generation()
        if generation is None:
            return store.find_principal(self._engine, token_hash)
        found = self._holders.get(token_hash)
        if found is None:
            found = store.find_principal(self._engine, token_hash)
            with self._lock:
                if found is not None and generation == self._generation:
                    if len(self._holders) >= MAX_HOLDERS:
                        self._holders.clear()
                    self._holders[token_hash] = found
        return found

    def hear(self, _keys):
        """A token changed (PostgresRelay heard it, or its connection came back after missing news): drop all."""
        with self._lock:
            self._generation += 1
            self._holders.clear()

    def _trusted_generation(self):
        """The cache's generation if what it holds may be used, after dropping it if a token changed; None when it
        cannot know of changes (a PostgreSQL replica whose relay does not listen)."""
        if self._stamp_path is None:
            listening = self.relay is not None and self.relay.listening.is_set()
            return self._generation if listening else None
        try:
            stamp = self._stamp_path.read_bytes()
        except FileNotFoundError:
            stamp = b""
        if stamp != self._stamp:
            self.hear(None)
            self._stamp = stamp
        return self._generation
