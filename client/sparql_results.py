"""Counting the rows of a SPARQL result while it streams through the gateway, never holding it whole.

Pure: fed chunk by chunk, whatever their boundaries. Exact for the W3C result formats
(JSON, XML, CSV, TSV) and for N-Triples; other formats (Turtle, JSON-LD, ...) count None.
Each counter works with bytes operations that run in C, so counting costs little next to
sending the bytes on.
"""

import re

_ESCAPED = re.compile(rb"\\.", re.DOTALL)
_WHITESPACE = b" \t\r\n"


def row_counter(content_type):
    """A counter for this Content-Type, or None where rows cannot be counted while streaming."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    return {
        "application/sparql-results+json": JsonRows,
        "application/json": JsonRows,
        "application/sparql-results+xml": XmlRows,
        "text/tab-separated-values": TsvRows,
        "text/csv": CsvRows,
        "application/n-triples": NTriplesRows,
    }.get(media_type, lambda: None)()


class JsonRows:
    """Rows are the objects in results.bindings: outside strings, the only objects that follow '[' or ','."""

    def __init__(self):
        self.count = 0
        self._in_string = False
        self._escape_pending = False  # a chunk ended inside a string on a lone backslash
        self._last = b""  # the last structural byte seen, for a ',{' split across chunks

    def feed(self, chunk):
        if self._escape_pending and chunk:
            chunk, self._escape_pending = chunk[1:], False
        # Backslashes occur only inside strings, so dropping every escape pair leaves only real quotes.
        chunk = _ESCAPED.sub(b"", chunk)
        if chunk.endswith(b"\\"):
            chunk, self._escape_pending = chunk[:-1], True
        parts = chunk.split(b'"')
        outside = b"".join(parts[1 if self._in_string else 0::2]).translate(None, _WHITESPACE)
        if len(parts) % 2 == 0:
            self._in_string = not self._in_string
        text = self._last + outside
        self.count += text.count(b",{") + text.count(b"[{")
        self._last = text[-1:]

    def rows(self):
        return self.count


class XmlRows:
    """One <result> element a row ('<' is escaped in XML text, so the tag cannot hide in a literal)."""
    TAG = b"<result>"

    def __init__(self):
        self.count = 0
        self._tail = b""

    def feed(self, chunk):
        text = self._tail + chunk
        self.count += text.count(self.TAG)
        # Shorter than the tag, so a tag counted now is never counted again.
        self._tail = text[-(len(self.TAG) - 1):]

    def rows(self):
        return self.count


class _Lines:
    """Lines, the last one counted even without its newline."""
    header_lines = 0

    def __init__(self):
        self.newlines = 0
        self._last = b""

    def feed(self, chunk):
        self.newlines += chunk.count(b"\n")
        self._last = chunk[-1:] or self._last

    def rows(self):
        lines = self.newlines + (1 if self._last not in (b"", b"\n") else 0)
        return max(lines - self.header_lines, 0)


class NTriplesRows(_Lines):
    """One triple a line (newlines in literals are escaped)."""


class TsvRows(_Lines):
    """A header line, then one line a row (newlines in literals are escaped)."""
    header_lines = 1


class CsvRows(_Lines):
    """A header line, then a line a row; a newline inside a quoted field is not a row's end."""
    header_lines = 1

    def __init__(self):
        super().__init__()
        self._in_quotes = False

    def feed(self, chunk):
        parts = chunk.split(b'"')
        # A doubled quote ("") inside a field splits into an empty part and flips twice: no change.
        self.newlines += sum(part.count(b"\n") for part in parts[1 if self._in_quotes else 0::2])
        if len(parts) % 2 == 0:
            self._in_quotes = not self._in_quotes
        self._last = chunk[-1:] or self._last
