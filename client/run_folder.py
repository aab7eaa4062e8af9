"""One run's folder in the work dir: its files, and what the runner must remember across a crash.

    work_dir/runs/<run id>/state.json     the claim (lease id, task, session, image) and progress
                          /input/input.txt the task's configuration, bound read-only at /input
                          /disk.img        the run's filesystem of fixed size (disk_limits.py), mounted at:
                          /disk/output/    bound at /output; its contents are the result
                          /disk/pytaskmanager-log.txt  bound at /log.txt for original PyTaskManager images
                          /log.txt         the container's stdout and stderr, then the runner's notes
                          /output.tar.gz   the packed output, once the container has ended
                          /*.age           output and log encrypted for the researcher (encrypted tasks)
                          /outbox/         files for third parties, encrypted to each (deliveries.py)
                          /gateway/sparql.sock  the run's SPARQL gateway, bound read-only into its relay
    work_dir/sessions/<session id>/temp/   bound at /temp for every task of that session; the mountpoint of
                          /disk.img        the session's filesystem of fixed size
                          /last-used       touched whenever a run of the session starts or ends
    work_dir/sparql-queries/<run id>.jsonl every query of the run (sparql_gateway.py); kept
    work_dir/spare-run/                    the next run's folder, made ahead (SpareRunFolder)

state.json is replaced atomically after each step, so after a crash the runner
knows how far each run got and carries on from there (runner.py); the folder is
deleted only once the registry has confirmed the run's end. Every path here is made
from the claim's checked integer ids (claim.py), so no value from the registry can
point outside work_dir. A folder whose state no longer reads as a valid claim is
moved to work_dir/set-aside/ with a log line, never read again at every start.
"""

import json
import logging
import os
import secrets
import stat
import threading
import time
from pathlib import Path

from client import disk_limits
from client.claim import InvalidClaim, parse_claim

log = logging.getLogger("pht.runner")

STATE_FILE = "state.json"


class RunFolder:
    def __init__(self, path, state):
        """Raises InvalidClaim if the state's claim does not validate."""
        self.path = Path(path)
        self.state = state
        self.claim = parse_claim(state.get("run") if isinstance(state, dict) else None)
        self.input_file = self.path / "input" / "input.txt"
        # Everything the algorithm can write lives on one filesystem, so one limit holds for all of it. A run
        # begun by a runner older than that kept it beside state.json, where its container still writes.
        self.disk_image = self.path / disk_limits.IMAGE_NAME
        self.older_layout = (self.path / "output").is_dir()
        self.disk = self.path if self.older_layout else self.path / "disk"
        self.output_dir = self.disk / "output"
        # Original PyTaskManager images write /output.txt: bound to a file inside /output/, it
        # comes back as part of the result without any copying.
        self.pytaskmanager_output = self.output_dir / "output.txt"
        self.pytaskmanager_log = self.disk / "pytaskmanager-log.txt"
        self.log_file = self.path / "log.txt"
        self.archive = self.path / "output.tar.gz"
        self.outbox = self.path / "outbox"
        self.gateway_dir = self.path / "gateway"

    @property
    def run_id(self):
        return self.claim.id

    @property
    def claim_key(self):
        """This site's own name for this claim of the run, which the IT officer's decisions are bound to: made
        here when the folder was, so a registry handing out the run id again cannot reuse a decision."""
        return self.state.get("claim_key") or f"{self.run_id}:{self.claim.lease_id}"  # folders from before it

    @classmethod
    def create(cls, runs_dir, claim, spare=None):
        """A new folder for a checked claim (client.claim.Claim): the spare folder (SpareRunFolder) if one is
        ready, else an empty one."""
        path = Path(runs_dir) / str(claim.id)
        # A folder left from an earlier claim of this run that the registry took back is stale.
        disk_limits.remove_folder(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if spare is None or not spare.take(path):
            path.mkdir()
        folder = cls(path, {"run": claim.as_dict(), "claim_key": secrets.token_hex(16)})
        folder.save()
        folder.claim = claim  # with the input it may carry, which state.json does not keep
        return folder

    @classmethod
    def load(cls, path):
        """The folder's run, or None if the runner stopped before writing state.json (nothing happened yet).
        Raises InvalidClaim if what is there is not a valid run's state, or belongs in another folder."""
        try:
            state = json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as error:  # state.json is replaced atomically, so this is no crash's doing
            raise InvalidClaim([f"{STATE_FILE} is not JSON ({error})"]) from None
        folder = cls(path, state)
        if folder.path.name != str(folder.run_id):
            raise InvalidClaim([f"it holds run {folder.run_id}"])
        return folder

    def save(self):
        temporary = self.path / (STATE_FILE + ".new")
        temporary.write_text(json.dumps(self.state), encoding="utf-8")  # no indent: the C encoder, ~10 times a run
        os.replace(temporary, self.path / STATE_FILE)

    def record(self, **progress):
        self.state.update(progress)
        self.save()

    def prepare_mounts(self, session_temp):
        """Prepare what the container sees, the input already downloaded to input_file and the run's and the
        session's filesystems mounted (or their folders made); returns (host path, path inside, mode) for each
        bind mount."""
        self.output_dir.mkdir(exist_ok=True)
        self.pytaskmanager_output.touch()
        self.pytaskmanager_log.touch()
        # The container runs as an unprivileged user: it must read its input and write its results,
        # whatever the runner's umask.
        self.input_file.parent.chmod(0o755)
        self.input_file.chmod(0o644)
        for writable in (self.output_dir, session_temp):
            writable.chmod(0o777)
        for writable in (self.pytaskmanager_output, self.pytaskmanager_log):
            writable.chmod(0o666)
        return [
            (self.input_file.parent, "/input", "ro"),
            (self.input_file, "/input.txt", "ro"),
            (self.output_dir, "/output", "rw"),
            (self.pytaskmanager_output, "/output.txt", "rw"),
            (self.pytaskmanager_log, "/log.txt", "rw"),
            (session_temp, "/temp", "rw"),
        ]

    def drop_unused_pytaskmanager_output(self):
        """An image that does not use the PyTaskManager's /output.txt leaves it empty: not part of the result."""
        try:
            info = self.pytaskmanager_output.lstat()
        except FileNotFoundError:  # the algorithm deleted it
            return
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            self.pytaskmanager_output.unlink()

    def read_pytaskmanager_log(self, max_bytes):
        """What an original PyTaskManager image wrote to /log.txt, cut at max_bytes."""
        with open(self.pytaskmanager_log, "rb") as own_log:
            text = own_log.read(max_bytes + 1)
        cut = f"\n(cut at {max_bytes} bytes)" if len(text) > max_bytes else ""
        return text[:max_bytes].decode("utf-8", errors="replace") + cut

    def remove(self):
        """Raises disk_limits.DiskProblem if the run's filesystem is still in use."""
        # state.json first: a folder without it is a left-over, whatever else could not be deleted.
        (self.path / STATE_FILE).unlink(missing_ok=True)
        disk_limits.remove_folder(self.path)


class SpareRunFolder:
    """A run folder made before its run is claimed, its filesystem (disk_limits) made and mounted: a claimed run
    takes it by renaming it, and need not wait for mkfs and mount (two processes, ~15 ms) on its way to its
    container. It is never given back: each run's filesystem is new, and holds nothing an earlier run wrote.

        work_dir/spare-run/      /disk.img and /disk/, as in a run's folder; ready once it has this name
        work_dir/spare-run.new/  while it is made
    """

    def __init__(self, path, size=None):
        """size: disk_limits.DiskSize of the filesystem make() makes (None: make() cannot be called)."""
        self.path, self.size = Path(path), size
        self._making = self.path.with_name(self.path.name + ".new")
        self._lock = threading.Lock()

    def make(self):
        """Make one unless one is ready. Raises disk_limits.DiskProblem (then runs make their own)."""
        with self._lock:
            if self.path.exists():
                return
            disk_limits.remove_folder(self._making)
            self._making.mkdir(parents=True)
            disk_limits.mount(self._making / disk_limits.IMAGE_NAME, self._making / "disk", self.size)
            os.rename(self._making, self.path)

    def take(self, destination):
        """Move the ready one to destination (which must not exist); False if none is ready. A rename, and so
        given to one run only."""
        try:
            os.rename(self.path, destination)
        except FileNotFoundError:
            return False
        except OSError as error:  # runs/ on another filesystem than the work folder, say: the run makes its own
            log.warning("the spare run folder %s could not be taken (%s); the run makes its own", self.path, error)
            return False
        return True

    def remove(self):
        """At the runner's start and stop: nothing is left mounted but runs' and sessions' filesystems. Raises
        disk_limits.DiskProblem."""
        with self._lock:
            for path in (self._making, self.path):
                disk_limits.remove_folder(path)


def unfinished_runs(runs_dir, busy=()):
    """Every run folder with a state, oldest run first; folders without one are left-overs and removed,
    folders whose state is not a valid run's are set aside. Those of the runs in busy (their ids) are left
    alone: their workers have them (and one may be removing its folder, state.json first)."""
    folders = []
    busy = {str(run_id) for run_id in busy}
    for path in sorted(Path(runs_dir).glob("*"), key=lambda p: (len(p.name), p.name)):
        if not path.is_dir() or path.is_symlink() or path.name in busy:
            continue
        try:
            folder = RunFolder.load(path)
        except InvalidClaim as error:
            set_aside(path, error)
            continue
        if folder is None:
            try:
                disk_limits.remove_folder(path)
            except disk_limits.DiskProblem as error:
                log.warning("left-over run folder %s: %s; removed at a later start", path, error)
        else:
            folders.append(folder)
    return folders


def parked_run(runs_dir, run_id):
    """The run's folder if the run is parked here (lifecycle.PARKED_STATES), else None. Read only, so the IT
    officer's commands can look while the runner works (a folder it cannot read is left to the runner)."""
    path = Path(runs_dir) / str(run_id)
    try:
        folder = RunFolder.load(path) if path.is_dir() and not path.is_symlink() else None
    except (InvalidClaim, OSError):
        return None
    return folder if folder is not None and folder.state.get("parked") else None


def parked_runs(runs_dir, status):
    """The run folders parked in that status, by run id; read only, as parked_run."""
    paths = sorted(Path(runs_dir).glob("*"), key=lambda p: (len(p.name), p.name))
    return [folder for folder in (parked_run(runs_dir, path.name) for path in paths)
            if folder is not None and folder.state["parked"] == status]


def set_aside(path, why):
    """Move a run folder the runner cannot carry on with out of its way, keeping it for a person to look at."""
    aside = Path(path).parent.parent / "set-aside" / f"{Path(path).name}-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        disk_limits.release(Path(path) / "disk")  # what an algorithm wrote is looked at from the image, if at all
    except disk_limits.DiskProblem as error:
        log.warning("run folder %s is not a run this runner can carry on with (%s), but its filesystem is in use "
                    "(%s); set aside at a later start", path, why, error)
        return
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, aside)
    log.warning("run folder %s is not a run this runner can carry on with (%s); moved it to %s", path, why, aside)
