"""How the dashboard shows things: pure decisions, tested without a server.

Everything shown comes out of here as plain text; the templates' autoescaping makes it safe HTML.
"""

from datetime import datetime, timezone

from common.printable import escaped
from master import lifecycle

# A state's colour, by what it means to the reader: done well, done badly, still moving, waiting for a person.
_STATE_LOOKS = {
    lifecycle.COMPLETED: "ok",
    lifecycle.FAILED: "bad",
    lifecycle.REFUSED: "bad",
    lifecycle.CANCELLED: "off",
    lifecycle.RUNNING: "busy",
    lifecycle.CLAIMED: "busy",
    lifecycle.PENDING: "waiting",
    lifecycle.EXPIRED: "warn",
    lifecycle.AWAITING_APPROVAL: "person",
    lifecycle.HELD_FOR_REVIEW: "person",
    lifecycle.TaskStatus.ACTIVE: "busy",
    lifecycle.TaskStatus.FINISHED_WITH_ERRORS: "bad",
}

LOG_TAIL_LINES = 40


def state_class(status):
    """The CSS class that colours a run's or task's state; one of a fixed few, whatever status holds."""
    return "state-" + _STATE_LOOKS.get(status, "unknown")


def state_words(status):
    """A state as words: finished_with_errors -> finished with errors."""
    return str(status).replace("_", " ")


def relative_time(at, now):
    """When at was, said from now: "just now", "4 min ago", "in 2 h"; "never" for None."""
    if at is None:
        return "never"
    if abs(now - at) < 10:
        return "just now"
    return f"in {duration(at - now)}" if at > now else f"{duration(now - at)} ago"


def duration(seconds):
    """A length of time in its largest whole unit: "45 s", "2 min", "3 h", "1 day"."""
    for size, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= size:
            amount = int(seconds // size)
            return f"{amount} {'day' if unit == 'days' and amount == 1 else unit}"
    return f"{int(seconds)} s"


def size(count):
    """A number of bytes for people: 999 B, 3.4 kB, 12 MB, 2.1 GB (powers of 1000, as disks are sold)."""
    for limit, unit in ((10 ** 9, "GB"), (10 ** 6, "MB"), (10 ** 3, "kB")):
        if count >= limit:
            amount = count / limit
            return f"{amount:.1f} {unit}" if amount < 10 else f"{amount:.0f} {unit}"
    return f"{count} B"


def utc_time(at):
    """An absolute time for a tooltip or a <time datetime>: 2026-12-04 18:30:05 UTC."""
    return "" if at is None else datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_time(at):
    return "" if at is None else datetime.fromtimestamp(at, timezone.utc).isoformat()


def progress(runs):
    """A task's progress bar: one segment per run, coloured by its state, and how many runs have ended."""
    done = sum(run["status"] in lifecycle.TERMINAL_STATES for run in runs)
    return {"done": done, "total": len(runs),
            "segments": [{"site": run["site"], "status": run["status"], "class": state_class(run["status"])}
                         for run in runs]}


def shown(text):
    """Text from a site or an algorithm (a name, a reason) on one line, its control characters spelled out, so a
    right-to-left override cannot reorder what the reader sees. Escaped for HTML by the template."""
    return "" if text is None else escaped(str(text))


def log_tail(data, cut_at_start, count=LOG_TAIL_LINES):
    """The last count lines of a log's end (bytes), as text with control characters spelled out (newlines and
    tabs kept). cut_at_start: data begins inside the log, so its first line may be a piece of one: dropped."""
    # Split at newlines alone: splitlines() would also split at (and so hide) form feeds and other separators.
    lines = data.decode("utf-8", errors="replace").removesuffix("\n").split("\n")
    if cut_at_start and len(lines) > 1:
        lines = lines[1:]
    return escaped("\n".join(lines[-count:]), keep="\n\t")
