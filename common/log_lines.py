"""The services' log lines: one line each, whatever a URL, a site or an algorithm put into a message.

A newline in a request path (%0a), a delivery's folder name or a failure reason would otherwise start
a line of the attacker's choosing in the operator's log, and an escape sequence would reach the
terminal that tails it. Control characters are spelled out instead (common.printable.escaped).
"""

import logging
import sys

from common.printable import escaped


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record):
        # The message only: a traceback (our own, added after it) keeps its lines.
        return escaped(super().formatMessage(record), keep="")


def log_to_stderr(line_format):
    """Log INFO and above to standard error, one escaped line per message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(line_format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
