"""Text from outside (a registry's answer, an algorithm's query, a file name) made safe to print.

A log line or a terminal shows it as printable ASCII only: a newline cannot forge another log
line, an escape sequence cannot rewrite the screen, and an HTTP status line stays one line.
"""


def printable(text):
    return "".join(char if " " <= char <= "~" else "?" for char in text)


def shown(value, limit=80):
    """A value from outside as a message may quote it: its repr, printable, cut short."""
    text = printable(repr(value))
    return text if len(text) <= limit else text[:limit - 3] + "..."
