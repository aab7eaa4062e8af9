"""What a researcher sees while waiting for a task: a bar of finished sites and each site's state.

Drawn on standard error, so standard output stays clean for results and --json, and only in a
terminal; it disappears when the wait ends, so a loop of rounds leaves only what the script prints.
"""

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.printable import escaped
from master import lifecycle

STATE_STYLES = {lifecycle.COMPLETED: "green", lifecycle.FAILED: "bold red", lifecycle.REFUSED: "bold red",
                lifecycle.CANCELLED: "yellow", lifecycle.RUNNING: "cyan", lifecycle.CLAIMED: "cyan",
                lifecycle.PENDING: "dim", lifecycle.AWAITING_APPROVAL: "bold magenta",
                lifecycle.HELD_FOR_REVIEW: "bold magenta"}


class SiteProgress:
    def __init__(self, task_id, enabled=True, console=None):
        """console: where to draw (default: standard error)."""
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.bar = Progress(TextColumn(f"task {task_id}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("sites done"), TimeElapsedColumn(), console=self.console)
        self.bar_task = self.bar.add_task("sites", total=None)
        self.live = Live(self.bar, console=self.console, transient=True)

    def __enter__(self):
        if self.enabled:
            self.live.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.live.stop()

    def show(self, runs):
        if not self.enabled:
            return
        finished = sum(run["status"] in lifecycle.TERMINAL_STATES for run in runs)
        self.bar.update(self.bar_task, total=len(runs), completed=finished)
        sites = Table.grid(padding=(0, 2))
        for run in runs:
            # Text, not markup: a site name or reason may contain brackets; escaped: or a terminal's controls.
            sites.add_row(Text(escaped(f"  {run['site']}")),
                          Text(escaped(str(run["status"])), style=STATE_STYLES.get(run["status"], "")),
                          Text(escaped(str(run["reason"] or ""))))
        self.live.update(Group(self.bar, sites))
