"""Text from outside (a registry's answer, an algorithm's query or log, a file or site name) made safe
to print.

A log line shows it as printable ASCII only (`printable`): a newline cannot forge another log line,
an escape sequence cannot rewrite the screen, and an HTTP status line stays one line.

A terminal shows it with its letters intact but its control characters spelled out (`escaped`):
`\\x1b]0;title\\x07` cannot set the window's title, `\\r` cannot overwrite a line already shown,
and a right-to-left override cannot reorder what the reader sees.
"""

import unicodedata

# Characters that reorder text on screen without being seen ("Trojan Source", CVE-2021-42574).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Category Cc holds C0, DEL and C1 (the latter include the 8-bit CSI, \x9b); line and paragraph
# separators move to a new line as a newline does; a lone surrogate (undecodable bytes in a file name,
# or "\ud800" in JSON) is something no terminal's encoding can write, so printing it would raise.
_ALWAYS_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


def printable(text):
    if text.isascii() and text.isprintable():  # " " to "~" only: checked in C
        return text
    return "".join(char if " " <= char <= "~" else "?" for char in text)


def shown(value, limit=80):
    """A value from outside as a message may quote it: its repr, printable, cut short."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def escaped(text, keep=""):
    """text for a terminal: every control character spelled out as \\xNN or \\uNNNN, except those in
    keep (a table cell or one-line message keeps none; a multi-line log keeps "\\n\\t")."""
    if text.isascii() and text.isprintable():  # no control character at all: the common case, checked in C
        return text
    return "".join(char if char in keep or not _is_control(char) else _spelled(char) for char in text)


def _is_control(char):
    return char in _BIDI_CONTROLS or unicodedata.category(char) in _ALWAYS_ESCAPED_CATEGORIES


def _spelled(char):
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
