"""One site's answer to a task, and reading the files the algorithm left in /output/."""

import io
import json
import tarfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from master import lifecycle

# The file an algorithm writes its main answer to, by convention (the original PyTaskManager's).
OUTPUT_FILE = "output.txt"
RUNNER_NOTE = "[site runner] "  # how the site runner starts the lines it adds to a log (docs/container-contract.md)


@dataclass
class RunResult:
    run_id: int
    site: str
    status: str  # completed, failed, refused or cancelled; pending, claimed or running if unfinished
    reason: str | None  # why it failed, was refused or cancelled
    exit_code: int | None
    image_digest: str | None  # the image the site ran, by digest
    log: str  # the algorithm's standard output and error
    output_archive: bytes | None = field(default=None, repr=False)  # /output/ as the site uploaded it
    # What the algorithm read through the site's SPARQL gateway: {"queries", "bytes", "refused"};
    # None when the site did not report it (no gateway, an older runner, or the run never started).
    sparql: dict | None = None

    @property
    def ok(self):
        return self.status == lifecycle.COMPLETED

    @cached_property
    def files(self):
        """The output files in memory: path inside /output/ -> bytes."""
        if self.output_archive is None:
            return {}
        with self._open_archive() as archive:
            return {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}

    @property
    def output(self):
        """output.txt parsed as JSON when it is JSON, else its text; None when there is none."""
        if OUTPUT_FILE not in self.files:
            return None
        text = self.files[OUTPUT_FILE].decode("utf-8", "replace")
        try:
            return json.loads(text)
        except ValueError:
            return text

    def read_json(self, name):
        return json.loads(self.files[name])

    def read_text(self, name):
        return self.files[name].decode("utf-8")

    def extract_to(self, folder):
        """Write the output files below folder (created if missing); returns it as a Path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.output_archive is not None:
            with self._open_archive() as archive:
                # The "data" filter refuses absolute paths, "..", links out of the folder and
                # special files: the archive comes from another organisation's machine.
                archive.extractall(folder, filter="data")
        return folder

    def describe_failure(self):
        """One line: which site, what happened and why, with the log's last line when the algorithm failed."""
        if self.ok:
            return f"{self.site} completed"
        words = f"{self.site} {self.status}"
        if self.reason:
            words += f": {self.reason}"
        # The algorithm's own last words: the site runner's notes come after them.
        last_line = next((line for line in reversed(self.log.splitlines())
                          if line.strip() and not line.startswith(RUNNER_NOTE)), None)
        if self.exit_code not in (None, 0) and last_line:
            words += f" (log: {last_line.strip()})"
        return words

    def _open_archive(self):
        return tarfile.open(fileobj=io.BytesIO(self.output_archive), mode="r:gz")
