"""The site runner against a compromised registry, the attacker's way (issue 12).

The registry may send any bytes in any field. Whatever it sends, the runner must not write
outside its work_dir, run anything its whitelist does not allow, crash or crash-loop, or keep
quiet about what it refuses; and a token that is not this site's own stops it with one line.

Each test drives the real runner process (client/runScript.py) against tests/fake_registry.py,
a registry on 127.0.0.1 that answers what the test scripts and records what the runner asked.
The runner's work_dir lies among canary files and folders (beside it, above it, and at the
absolute path a hostile id names); every test compares them, modes included, before and
after, and lists the Docker containers created with the runner's labels meanwhile.

A runner's start costs seconds (its SPARQL gateway self-test runs containers), so the tests that need
nothing but a runner of the default config share a pool of them (marked shared_runner): each test sees its
runner's registry record and output from its own start on, and the containers created since; the
canaries are compared with their listing when the pool was made. Each pooled runner, having dealt with
every test's hostile answers, must still stop with exit code 0 and have written no traceback (checked
when the module ends). A test that needs another config, or the runner's start itself (its identity
check, what it finds in work_dir), starts a runner of its own (site).
"""

import base64
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from client import containers, disk_limits
from scripts.federation import DEFAULT_WHITELIST, IMAGE_REGISTRY, OXIGRAPH, PYTHON, ROOT, free_port, wait_until_answers
from client.officer_commands import Officer
from client.site_config import load_site_config
from tests.fake_registry import Answer, FakeRegistry
from tests.images import algorithm_containers, engine_or_fail, pinned_test_image

SITE = "hospital-h"
OFF_WHITELIST = f"{IMAGE_REGISTRY}/evil/pht/contract-probe:latest"
REFUSED = "the site runner refused the claim:"
INVALID_LOGGED = "invalid claim from the registry:"
WHITELIST_REFUSED = "matches no entry of this site's whitelist"
TOKEN_REFUSED = "refused this site's token"
# A line the runner's logging wrote (runScript.py's format), as opposed to the one line it exits with.
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
NESTED_JSON = b"[" * 100_000 + b"]" * 100_000


# --- fixtures ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe():
    engine_or_fail()
    return pinned_test_image("contract-probe")


@pytest.fixture(scope="module")
def sparql_endpoint(tmp_path_factory):
    """A real, read-only SPARQL endpoint with one triple: the runner's start-up self-test asks it."""
    folder = tmp_path_factory.mktemp("sparql")
    (folder / "one.nt").write_text("<http://example.org/s> <http://example.org/p> <http://example.org/o> .\n")
    subprocess.run([OXIGRAPH, "load", "--location", str(folder / "store"), "--file", str(folder / "one.nt")],
                   check=True, capture_output=True)
    port = free_port()
    server = subprocess.Popen([OXIGRAPH, "serve-read-only", "--location", str(folder / "store"),
                               "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/", server, "the test's SPARQL endpoint")
        yield f"http://127.0.0.1:{port}/query"
    finally:
        server.terminate()
        server.wait(timeout=15)


@pytest.fixture(scope="module")
def pool(tmp_path_factory, sparql_endpoint):
    pool = RunnerPool(tmp_path_factory.mktemp("pool"), sparql_endpoint)
    yield pool
    pool.tear_down()


@pytest.fixture
def site(request, tmp_path, sparql_endpoint):
    """A site with runners of its own; for a test marked shared_runner, the pool's site as that test sees it, with
    the pool's first runner ready."""
    if request.node.get_closest_marker("shared_runner"):
        site = SharedSite(request.getfixturevalue("pool"))
    else:
        site = Site(tmp_path, FakeRegistry(SITE), sparql_endpoint)
    yield site
    site.tear_down()


# The config every runner gets but for what a test changes: the poll interval is as short as a site may set.
RUNNER_SETTINGS = {"long_poll_seconds": 1, "poll_interval_seconds": 0.2, "max_input_bytes": 65536}


class Site:
    """A site's folders, its work_dir among canaries, and its runner processes (stopped at the end)."""

    def __init__(self, tmp_path, registry, sparql_endpoint):
        self.tmp_path, self.registry, self.sparql_endpoint = tmp_path, registry, sparql_endpoint
        self.root = tmp_path / "root"
        self.work_dir = self.root / "site" / "work"
        self.work_dirs = [self.work_dir]
        self.absolute_target = self.root / "abs-target"  # what a hostile id naming an absolute path points at
        make_canaries(self.root)
        self.work_dir.mkdir()
        self.runners = []
        self.extra_registries = []
        self.started_at = time.time()
        self.slash_abs_existed = Path("/abs").exists()
        self.before = listing(self.root, self.work_dirs)

    def add_work_dir(self, name):
        work_dir = self.root / "site" / name
        work_dir.mkdir()
        self.work_dirs.append(work_dir)
        self.before = listing(self.root, self.work_dirs)
        return work_dir

    def extra_registry(self):
        """Another fake registry for this site (for another runner), stopped at the end."""
        self.extra_registries.append(FakeRegistry(SITE))
        return self.extra_registries[-1]

    def start_runner(self, *args, registry=None, work_dir=None, **settings):
        """A runner process with this site's config, changed by settings (container fields merge)."""
        registry = registry or self.registry
        config = {
            "registry_url": registry.url,
            "site_name": SITE,
            "site_token": "the-site-token",
            "sparql_endpoint": self.sparql_endpoint,
            "whitelist": DEFAULT_WHITELIST,
            "work_dir": str(work_dir or self.work_dir),
            **RUNNER_SETTINGS,
            "container": {"timeout_seconds": 120, **settings.pop("container", {})},
            **settings,
        }
        number = len(self.runners) + 1
        config_path = self.tmp_path / f"config-{number}.json"
        config_path.write_text(json.dumps(config))
        runner = Runner(config_path, self.tmp_path / f"runner-{number}", args, registry)
        self.runners.append(runner)
        return runner

    def changes_outside_work_dirs(self):
        """What differs outside the work dirs since the site was set up: [(path, before, after)]."""
        after = listing(self.root, self.work_dirs)
        changes = [(path, self.before.get(path), after.get(path)) for path in sorted(set(self.before) | set(after))
                   if self.before.get(path) != after.get(path)]
        if Path("/abs").exists() != self.slash_abs_existed:
            changes.append(("/abs", self.slash_abs_existed, not self.slash_abs_existed))
        return changes

    def containers_created(self):
        """The labels of every container created for this site's work dirs since the site was set up."""
        engine = docker.from_env()
        created = []
        for work_dir in self.work_dirs:
            # Asked from a second early (the engine's since is in whole seconds), then cut at the set-up's moment:
            # a pooled runner's containers of the test before are not this test's.
            created += [event["Actor"]["Attributes"] for event in engine.events(
                since=self.started_at - 1, until=time.time(), decode=True, filters={
                    "type": "container", "event": "create",
                    "label": [f"{containers.SITE_LABEL}={SITE}", f"{containers.WORK_DIR_LABEL}={work_dir}"]})
                if event["timeNano"] >= self.started_at * 1e9]
        return created

    def runs_given_containers(self):
        """Run ids that containers were created for, the start-up self-test's (run 0) left out."""
        return {labels[containers.RUN_LABEL] for labels in self.containers_created()} - {"0"}

    def assert_unharmed(self, allowed_runs=(), exited=()):
        """Nothing changed outside the work dirs, containers only for the allowed runs, every runner alive (but
        those stopped, or expected to have exited) and its output free of tracebacks and raw control characters."""
        changes = self.changes_outside_work_dirs()
        assert not changes, "changed outside the work dirs (path, before, after):\n" + "\n".join(map(str, changes))
        assert self.runs_given_containers() <= {str(run_id) for run_id in allowed_runs}
        for runner in self.runners:
            if not runner.stopped and runner not in exited:
                runner.check_alive()
            runner.assert_clean_output()

    def tear_down(self):
        for runner in self.runners:
            runner.stop()
        for registry in [self.registry] + self.extra_registries:
            registry.stop()
        engine = docker.from_env()
        for work_dir in self.work_dirs:
            for container in containers.containers_of(engine, SITE, work_dir):
                containers.remove(engine, container.id)


# Runners of the pool: deal_out hands invalid claims to all of them side by side, since each costs a runner a
# poll interval; started together, they cost about one start.
POOL_SIZE = 6


class RunnerPool:
    """Runners of the default config, each with its own fake registry and work_dir, among one site's canaries, kept
    from test to test; started when a test first needs them, and again after one exits (a test may stop it)."""

    def __init__(self, tmp_path, sparql_endpoint):
        self.site = Site(tmp_path, FakeRegistry(SITE), sparql_endpoint)
        self.work_dirs = [self.site.work_dir] + [self.site.add_work_dir(f"work-{number}")
                                                 for number in range(2, POOL_SIZE + 1)]
        self.registries = [self.site.registry] + [self.site.extra_registry() for _ in range(POOL_SIZE - 1)]
        self.live = [None] * POOL_SIZE
        self.handed_out = 0

    def runners(self, count):
        """The first count runners, started if need be, each idle and online, its registry's record and script
        emptied, and its output from here on the test's own."""
        # Any that is not running is started now, needed or not: starts side by side cost about one start.
        for index in range(POOL_SIZE):
            if self.live[index] is None or self.live[index].process.poll() is not None:
                self.live[index] = self.site.start_runner(registry=self.registries[index],
                                                          work_dir=self.work_dirs[index])
        for runner in self.live[:count]:
            runner.wait_for(lambda: runner.registry.requests("claim"), "the pooled runner polls", timeout=60)
            # A quiet answer, then its next poll: the runner has no run (it polls only with a free slot), it is
            # online, and a registry problem of the test before is over (so the next one is logged at once).
            self.handed_out += 1
            offer_and_wait_for_next_poll(runner, Answer.no_content(), f"a quiet answer ({self.handed_out})")
            runner.registry.reset()
            runner.mark()
        return self.live[:count]

    def idle(self, index):
        runs = self.work_dirs[index] / "runs"
        return not (runs.exists() and any(runs.iterdir())) and not algorithm_containers(SITE, self.work_dirs[index])

    def release(self, runners):
        """After a test: a runner still busy (its test failed half-way) is killed and its work_dir emptied, so that
        the next test does not inherit its run."""
        for index, runner in enumerate(self.live):
            if runner is None or runner not in runners:
                continue
            if runner.process.poll() is not None:
                self.live[index] = None  # stopped by its test: the next one starts another
                continue
            try:
                runner.wait_for(lambda: self.idle(index), "the pooled runner cleans up after its last run", timeout=15)
            except AssertionError:
                runner.stopped = True
                runner.process.kill()
                runner.process.wait()
                self.live[index] = None
                engine = docker.from_env()
                for container in containers.containers_of(engine, SITE, self.work_dirs[index]):
                    containers.remove(engine, container.id)
                disk_limits.release_all_under(self.work_dirs[index])
                for path in self.work_dirs[index].iterdir():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()

    def tear_down(self):
        """Every runner, after all the tests' hostile answers, stops as an IT officer stops it (exit code 0), and
        wrote no traceback or raw control character at any time."""
        try:
            running = [runner for runner in self.live if runner is not None and not runner.stopped]
            for runner in running:  # all told first: each takes up to a long-poll to notice
                runner.signal_stop()
            codes = [runner.stop() for runner in running]
            assert codes == [0] * len(codes), f"the pooled runners' exit codes: {codes}"
            for runner in self.site.runners:
                runner.assert_clean_output(whole=True)
        finally:
            self.site.tear_down()


class SharedSite(Site):
    """The pool's site as one test sees it: its runners' registry record and output since the test's start, the
    containers created since, and the canaries as the pool first listed them (whatever any test's runner did
    outside its work_dir is caught)."""

    def __init__(self, pool):
        self.pool = pool
        self.tmp_path, self.sparql_endpoint = pool.site.tmp_path, pool.site.sparql_endpoint
        self.root, self.work_dir, self.absolute_target = pool.site.root, pool.site.work_dir, pool.site.absolute_target
        self.work_dirs, self.before = pool.work_dirs, pool.site.before
        self.registry = pool.registries[0]
        self.runners, self.extra_registries = [], []
        self.slash_abs_existed = Path("/abs").exists()
        self.started_at = time.time()
        self.dealing_runners(1)

    def dealing_runners(self, count=POOL_SIZE):
        """The pool's first count runners, ready for this test; and each one's sessions as they are now."""
        self.runners = self.pool.runners(count)
        self.sessions_before = {work_dir: session_names(work_dir) for work_dir in self.work_dirs}
        return self.runners

    def start_runner(self, *args, **settings):
        """The pool's first runner, which has the default config: a test that needs another starts its own (site)."""
        assert not args and all(RUNNER_SETTINGS.get(name) == value for name, value in settings.items()), (
            f"a pooled runner has the default config, not {args} {settings}")
        return self.runners[0]

    def add_work_dir(self, name):
        raise AssertionError("the pool's work_dirs are its runners'")

    def tear_down(self):
        for registry in self.extra_registries:
            registry.stop()
        self.pool.release(self.runners)


def session_names(work_dir):
    """The session folders in work_dir (None: no sessions folder at all)."""
    sessions = work_dir / "sessions"
    return sorted(path.name for path in sessions.iterdir()) if sessions.exists() else None


class Runner:
    """One client/runScript.py process; its stdout and stderr go to files."""

    def __init__(self, config_path, log_prefix, args, registry):
        self.registry, self.config_path = registry, config_path
        self.stopped = False  # on purpose, by stop()
        self.stdout_path = Path(f"{log_prefix}.stdout")
        self.stderr_path = Path(f"{log_prefix}.stderr")
        self._since = (0, 0)  # where in stdout and stderr the test's own output begins (mark)
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([PYTHON, str(ROOT / "client" / "runScript.py"), "--config",
                                             str(config_path), *args], stdout=stdout, stderr=stderr, cwd=ROOT)

    def mark(self):
        """What the runner wrote so far is not the next test's: output and stderr_lines begin here (a pooled runner)."""
        self._since = (self.stdout_path.stat().st_size, self.stderr_path.stat().st_size)

    @property
    def raw_output(self):
        return self.stdout_path.read_bytes()[self._since[0]:] + self.stderr_path.read_bytes()[self._since[1]:]

    @property
    def output(self):
        return self.raw_output.decode("utf-8", "replace")

    @property
    def stderr_lines(self):
        return self.stderr_path.read_bytes()[self._since[1]:].decode("utf-8", "replace").splitlines()

    def check_alive(self):
        if self.process.poll() is not None:
            last_served = [request.served for request in self.registry.requests("claim") if request.served]
            raise AssertionError(f"the runner exited with code {self.process.returncode} (the last claim answer it "
                                 f"got: {last_served[-1:]}); it wrote:\n{self.output[-6000:]}")

    def assert_clean_output(self, whole=False):
        """No traceback, no raw ESC or CR: in what it wrote since the mark, or since it started (whole)."""
        raw = self.stdout_path.read_bytes() + self.stderr_path.read_bytes() if whole else self.raw_output
        assert b"Traceback" not in raw, f"the runner wrote a traceback:\n{self.output[-6000:]}"
        control = [line for line in raw.split(b"\n") if b"\x1b" in line or b"\r" in line]
        assert not control, f"raw ESC or CR in the runner's output: {control}"

    def wait_for(self, condition, what, timeout=30):
        """Wait for condition(), failing at once if the runner exits meanwhile."""
        try:
            return self.registry.wait_for(condition, what, timeout, also=self.check_alive)
        except AssertionError as error:
            if self.process.poll() is not None:
                raise
            raise AssertionError(f"{error}; the runner wrote:\n{self.output[-6000:]}") from None

    def wait_for_log(self, text, what, timeout=30):
        self.wait_for(lambda: text in self.output, what, timeout)

    def wait_for_exit(self, what, timeout=30):
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the runner did not exit within {timeout} s: {what}; it wrote:\n"
                                 f"{self.output[-4000:]}") from None

    def stop(self):
        """SIGTERM, as an IT officer stops it; returns its exit code (killed if it does not exit in 60 s)."""
        self.signal_stop()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def signal_stop(self):
        """One SIGTERM (a second would make it exit at once), unless it was stopped already."""
        if not self.stopped and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.stopped = True


def make_canaries(root):
    """Files and folders around the work dir (root/site/work) that no registry may touch."""
    for path, mode in [("", 0o755), ("above-dir", 0o700), ("x", 0o700), ("x/temp", 0o700), ("abs-target", 0o700),
                       ("abs-target/temp", 0o700), ("site", 0o755), ("site/x", 0o700), ("site/x/temp", 0o700),
                       ("site/runs", 0o700), ("site/sessions", 0o700)]:
        (root / path).mkdir(exist_ok=True)
        (root / path).chmod(mode)
    for path, mode in [("above.txt", 0o600), ("above-dir/inner.txt", 0o640), ("x/keep.txt", 0o600),
                       ("abs-target/keep.txt", 0o600), ("site/beside.txt", 0o600), ("site/x/keep.txt", 0o600),
                       ("site/x/temp/keep.txt", 0o444)]:
        (root / path).write_text(f"canary {path}\n")
        (root / path).chmod(mode)


def listing(root, skipped):
    """Every file and folder under root but the skipped folders: path -> (mode, owner, size, mtime, sha256)."""
    skipped = {Path(path) for path in skipped}
    entries = {}
    for folder, folders, files in os.walk(root):
        folders[:] = [name for name in folders if Path(folder, name) not in skipped]
        for path in [Path(folder)] + [Path(folder, name) for name in folders + files]:
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            entries[str(path.relative_to(root))] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid,
                                                    info.st_size, info.st_mtime_ns, digest)
    return entries


def claim(run_id, image, **changes):
    """A well-formed claim (docs/api.md), with the given fields changed."""
    return {"id": run_id, "task_id": run_id, "session_id": run_id, "image": image, "lease_id": f"lease-{run_id}",
            "lease_seconds": 30, "timeout_seconds": None, "recipients": [], "name": None, **changes}


def offer_and_wait_for_next_poll(runner, answer, what, timeout=30):
    """Hand the runner a claim answer and wait until it asks for another (so it has dealt with this one)."""
    label = runner.registry.offer_claim(answer, label=what)
    runner.wait_for(lambda: runner.registry.claim_requests_after(label),
                    f"the runner asks for a claim again after {what}", timeout)


def wait_for_finish(runner, run_id, timeout=30):
    """The run's one finish report."""
    runner.wait_for(lambda: runner.registry.requests("finish", run_id=run_id), f"run {run_id} is finished", timeout)
    [report] = runner.registry.bodies("finish", run_id=run_id)
    return report


def lines_naming(lines, *words):
    return [line for line in lines if all(word in line for word in words)]


# --- 1. claim fields used as paths, leases, images --------------------------------------

@dataclass
class Case:
    """A claim answer, and what the runner must do with it."""
    what: str
    answer: object  # a JSON value, or an Answer
    refused_run: int | None = None  # the run its refusal must name; None: it cannot be refused, only logged
    reason: str = REFUSED  # in the refusal's reason
    invalid: bool = True  # logged as an invalid claim (a valid claim off the whitelist is not)


def deal_out(site, cases):
    """Hand the cases' claim answers to the pool's runners, each with its own registry and work_dir, in turn (an
    invalid claim costs a runner a poll interval); wait until each runner has asked for another claim after each of
    its own. Returns the runners, and which runner got which case."""
    runners = site.dealing_runners()
    dealt = {}
    for index, case in enumerate(cases):
        dealt[case.what] = runners[index % len(runners)]
        dealt[case.what].registry.offer_claim(case.answer, label=case.what)
    for case in cases:
        runner = dealt[case.what]
        runner.wait_for(lambda: runner.registry.claim_requests_after(case.what),
                        f"the runner asks for a claim again after {case.what}", timeout=60)
    return runners, dealt


def check_dealt(cases, runners, dealt):
    """Each refusable case refused with its reason, each other one logged, and nothing else done with any."""
    for runner in runners:
        mine = [case for case in cases if dealt[case.what] is runner]
        for case in mine:
            if case.refused_run is None:
                continue
            refusals = runner.registry.bodies("refuse", run_id=case.refused_run)
            assert len(refusals) == 1, f"{case.what}: the refusals of run {case.refused_run}: {refusals}"
            [refusal] = refusals
            assert case.reason in refusal["reason"], (case.what, refusal)
            assert refusal["reason"].startswith(REFUSED) == case.invalid, (case.what, refusal)
            assert refusal["lease_id"] == f"lease-{case.refused_run}", case.what
        # The registry heard of these runs only their refusals: no input fetched, nothing started.
        assert sorted((request.kind, request.run_id) for request in runner.registry.requests() if request.run_id) == (
            sorted(("refuse", str(case.refused_run)) for case in mine if case.refused_run is not None))
        assert len(lines_naming(runner.output.splitlines(), INVALID_LOGGED)) == sum(case.invalid for case in mine)


def path_values(site):
    return ["../../x", "../../../x", "/abs/path", str(site.absolute_target), -1, 0, 2 ** 40, 1.5, True, None, "123"]


HOSTILE_LEASES = ["lease\r\nX-Injected: yes", "lease/../../x", "../../x"]


def hostile_images(probe):
    return [123, f"{IMAGE_REGISTRY}/pht/" + "a" * 10_000, probe + "\n", "--privileged", f"-v/:/host {probe}"]


@pytest.mark.shared_runner
def test_claim_fields_used_as_paths_touch_nothing_outside_work_dir(site, probe):
    """Ids as paths, leases with CRLF or '/', images that are not references or are off the whitelist: refused
    (or logged, when there is no id and lease to refuse with), nothing created, chmod-ed or deleted outside
    work_dir, no container, and the runner goes on. The images are whitelisted where they parse, so a claim let
    through would run."""
    cases = []
    run_id = 100
    for field in ("id", "task_id", "session_id"):
        for value in path_values(site):
            run_id += 1
            cases.append(Case(f"{field} {value!r}", claim(run_id, probe, **{field: value}),
                              refused_run=None if field == "id" else run_id, reason=f"{field} must"))
    for lease in HOSTILE_LEASES:
        run_id += 1
        cases.append(Case(f"lease_id {lease!r}", claim(run_id, probe, lease_id=lease)))
    for image in hostile_images(probe):
        run_id += 1
        cases.append(Case(f"image {str(image)[:40]!r}", claim(run_id, image), refused_run=run_id, reason="image "))
    run_id += 1
    cases.append(Case("an image off the whitelist", claim(run_id, OFF_WHITELIST), refused_run=run_id,
                      reason=WHITELIST_REFUSED, invalid=False))
    run_id += 1
    # The tag a pinned reference names may since have been moved to another image: by default it never runs.
    cases.append(Case("a whitelisted image named by tag only", claim(run_id, probe.partition("@")[0]),
                      refused_run=run_id, reason="this site runs only images pinned by digest", invalid=False))

    runners, dealt = deal_out(site, cases)

    site.assert_unharmed()
    check_dealt(cases, runners, dealt)
    for work_dir in site.work_dirs:
        # No session folder made (a pooled runner may hold some from an earlier test's runs), no run folder.
        assert session_names(work_dir) == site.sessions_before[work_dir]
        assert list((work_dir / "runs").iterdir()) == []

# --- 2. malformed answers -----------------------------------------------------------------

@pytest.mark.shared_runner
def test_malformed_claim_answers_then_a_good_claim_still_runs(site, probe):
    """Claim answers that are not a claim, mixed with 204s: refused when they name a run and lease, else logged;
    the runner keeps polling, and then runs a good claim to its end."""
    ten_mb = 10 * 1024 ** 2
    cases = [
        Case("a JSON list", [claim(201, probe)]),
        Case("a JSON string", "claim"),
        Case("JSON null", None),
        Case("an empty 200 answer", Answer.text(b"", content_type="application/json")),
        Case("a body that is not JSON", Answer.text(b"<html>\x00\xff\xfe not json", content_type="application/json")),
        Case("10 MB of JSON", Answer.text(b"[" + b"0," * (ten_mb // 2) + b"0]", content_type="application/json")),
        Case("an id of 5000 digits", Answer.text(b'{"id": ' + b"7" * 5000 + b', "lease_id": "lease-7"}')),
        Case("an empty object", {}),
        Case("only an id", {"id": 202}),
        Case("only an id and a lease", {"id": 203, "lease_id": "lease-203"}, refused_run=203,
             reason="image is missing"),
        Case("no image", {k: v for k, v in claim(204, probe).items() if k != "image"}, refused_run=204),
        Case("lease_seconds null", claim(205, probe, lease_seconds=None), refused_run=205, reason="lease_seconds"),
        Case("lease_seconds 2", claim(206, probe, lease_seconds=2), refused_run=206, reason="lease_seconds"),
        Case("lease_seconds 86401", claim(207, probe, lease_seconds=86401), refused_run=207, reason="lease_seconds"),
        Case("timeout_seconds 0", claim(208, probe, timeout_seconds=0), refused_run=208, reason="timeout_seconds"),
        Case("timeout_seconds 2**31", claim(209, probe, timeout_seconds=2 ** 31), refused_run=209,
             reason="timeout_seconds"),
        Case("recipients ['not-a-key']", claim(210, probe, recipients=["not-a-key"]), refused_run=210,
             reason="recipients"),
        Case("recipients a string", claim(211, probe, recipients="age1" + "q" * 58), refused_run=211,
             reason="recipients"),
        Case("recipients [123]", claim(212, probe, recipients=[123]), refused_run=212, reason="recipients"),
        Case("a name of 10,000 characters", claim(213, probe, name="n" * 10_000), refused_run=213, reason="name"),
        Case("a name that is a number", claim(214, probe, name=5), refused_run=214, reason="name"),
        # Unknown fields are ignored, but an answer over 1 MiB is not read at all: too large to be a claim.
        Case("10 MB of an unknown field", claim(215, OFF_WHITELIST, padding="p" * ten_mb)),
    ]
    # 204s and 200s mixed: no run, then the next hostile answer.
    cases = [mixed for case in cases for mixed in (case, Case(f"a 204 after {case.what}", Answer.no_content(),
                                                              invalid=False))]

    runners, dealt = deal_out(site, cases)

    check_dealt(cases, runners, dealt)
    runner = runners[0]
    site.registry.offer_claim(claim(216, probe))
    report = wait_for_finish(runner, 216)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    site.assert_unharmed(allowed_runs=[216])

@pytest.mark.shared_runner
def test_malformed_heartbeat_answers_do_not_stop_a_run(site, probe):
    """Heartbeat answers that are not JSON, lack status, or are an error with escapes in its message: the
    runner treats them as a registry problem, goes on beating, and the run ends normally."""
    runner = site.start_runner()
    hostile = [Answer.text("not json"), Answer.json({"nostatus": "running"}), Answer.json(["running"]),
               Answer.json({"status": 5}), Answer.json({"status": "\x1b[2Jcancelled\r"}),
               Answer.json({"message": "\x1b[31mforged\r\n2026-01-01 00:00:00,000 ERROR forged line"}, status=400)]
    site.registry.script("heartbeat", *hostile, run_id=301)
    site.registry.script("input", Answer.text(json.dumps({"sleep": 8})), run_id=301)
    site.registry.offer_claim(claim(301, probe, lease_seconds=3))

    runner.wait_for(lambda: len(site.registry.requests("heartbeat", run_id=301)) > len(hostile),
                    "the runner beats again after every hostile heartbeat answer", timeout=40)
    report = wait_for_finish(runner, 301)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    assert "heartbeat for run 301 failed" in runner.output
    assert "heartbeat for run 301: the registry answers again" in runner.output
    site.assert_unharmed(allowed_runs=[301])


@pytest.mark.shared_runner
def test_input_over_the_site_limit_fails_the_run_before_any_container(site, probe):
    """An input without end, or larger than max_input_bytes: the run fails with the reason, reported
    through finish, and no container starts; an input of exactly the limit runs."""
    runner = site.start_runner(max_input_bytes=65536)
    site.registry.script("input", Answer.endless(), run_id=401)
    site.registry.script("input", Answer.endless(content_length=10 ** 12), run_id=402)
    site.registry.script("input", Answer.text(b"x" * 65537, content_type="application/octet-stream"), run_id=403)
    site.registry.script("input", Answer.text(b" " * 65536, content_type="application/octet-stream"), run_id=404)
    for run_id in (401, 402, 403):
        site.registry.offer_claim(claim(run_id, probe))
        report = wait_for_finish(runner, run_id)
        assert report["exit_code"] is None
        assert "over this site's limit" in report["failure_reason"], report
        assert site.runs_given_containers() == set(), f"run {run_id}: a container was created"
    site.registry.offer_claim(claim(404, probe))
    report = wait_for_finish(runner, 404)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    site.assert_unharmed(allowed_runs=[404])


def test_an_input_and_results_within_the_claim_and_the_finish_keep_the_sites_limits(site, probe):
    """API 1.4: the claim carries the input, which the site's max_input_bytes bounds as it bounds a download (the
    run fails before any container), and one within it is taken from the claim, not asked for; a claim that offers
    it (inline_result_bytes) gets the small output and log within the finish report, and no upload."""
    runner = site.start_runner(max_input_bytes=1024)
    site.registry.offer_claim(claim(411, probe, input_base64=base64.b64encode(b"x" * 1025).decode()))
    report = wait_for_finish(runner, 411)
    assert report["exit_code"] is None and "over this site's limit of 1024 bytes" in report["failure_reason"], report
    assert site.runs_given_containers() == set()

    given = b'{"label": "from the claim"}'
    site.registry.offer_claim(claim(412, probe, input_base64=base64.b64encode(given).decode(),
                                    inline_result_bytes=49152))
    report = wait_for_finish(runner, 412)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    assert site.registry.requests("input", run_id=412) == []
    assert site.registry.requests("output", run_id=412) == [] and site.registry.requests("log", run_id=412) == []
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(report["output_base64"]))) as archive:
        seen = json.load(archive.extractfile("seen.json"))
    assert base64.b64decode(seen["input_base64"]) == given
    assert "probe: on stdout" in base64.b64decode(report["log_base64"]).decode()
    site.assert_unharmed(allowed_runs=[412])


@pytest.mark.shared_runner
def test_an_error_answer_to_the_input_download_is_a_registry_problem(site, probe):
    """The registry answers the input download with an error: the run fails naming the registry's answer
    (made printable), reported through finish; the runner does not treat it as its own crash."""
    runner = site.start_runner()
    site.registry.script("input", Answer.json({"message": "\x1b[2Jgone\r\nforged"}, status=404), run_id=501)
    site.registry.offer_claim(claim(501, probe))
    report = wait_for_finish(runner, 501)
    assert report["exit_code"] is None and report["failure_reason"]
    assert "\x1b" not in report["failure_reason"] and "\r" not in report["failure_reason"]
    site.assert_unharmed()


# --- transport-level answers -------------------------------------------------------------------

def redirect(location, status=307):
    return Answer(status, b"", (("Location", location), ("Content-Length", "0")))


# Each: the answers the fake gives to consecutive claim requests (a redirect's target is one too).
CLAIM_TRANSPORT_ATTACKS = {
    "deeply nested JSON": [Answer.text(NESTED_JSON, content_type="application/json")],
    "deeply nested JSON in a 400 error": [Answer(400, NESTED_JSON)],
    "a redirect to file:///etc/passwd": [redirect("file:///etc/passwd")],
    # The runner follows no redirect at all (a registry answers for itself), so no chain of them can hold it.
    "a redirect back to the claim": [redirect("/api/site/claim")],
    "a body cut short of its Content-Length": [Answer.raw_bytes(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\": 1")],
    "a gzip Content-Encoding that is not gzip": [Answer(
        200, b"this is not gzip at all", (("Content-Type", "application/json"), ("Content-Encoding", "gzip")))],
    "broken chunked encoding": [Answer.raw_bytes(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")],
    "a status line that is not HTTP": [Answer.raw_bytes(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")],
    "a thousand headers": [Answer.raw_bytes(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(1000)) + b"Content-Length: 2\r\n\r\n{}")],
}


@pytest.mark.shared_runner
@pytest.mark.parametrize("what", CLAIM_TRANSPORT_ATTACKS)
def test_claim_answers_broken_at_the_http_level(site, what):
    """Answers a broken or hostile HTTP server may give: the runner neither crashes nor stops polling, and
    then refuses the next well-formed claim as it should."""
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner's first claim request")
    answers = CLAIM_TRANSPORT_ATTACKS[what]
    labels = [site.registry.offer_claim(answer, label=f"{what} ({index + 1} of {len(answers)})")
              for index, answer in enumerate(answers)]
    runner.wait_for(lambda: site.registry.claim_requests_after(labels[-1]),
                    f"the runner asks for a claim again after {what}")
    site.registry.offer_claim(claim(601, OFF_WHITELIST))
    runner.wait_for(lambda: site.registry.requests("refuse", run_id=601), "the next claim is refused")
    site.assert_unharmed()


def gzip_bomb(size):
    """A gzip body that inflates to size bytes of spaces, a two-hundredth of that on the wire."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    megabyte = b" " * 1024 ** 2
    return b"".join([compressor.compress(megabyte) for _ in range(size // len(megabyte))] + [compressor.flush()])


def peak_memory(pid):
    """The process's peak resident memory so far, in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.shared_runner
def test_a_claim_answer_that_inflates_to_half_a_gigabyte_is_not_taken_whole(site):
    """A gzip answer of 2 MB that inflates to 512 MiB (the runner asks for gzip): the runner must not take it into
    memory whole, or a registry could make it run out of memory with one small answer."""
    bomb = Answer(200, gzip_bomb(512 * 1024 ** 2), (("Content-Type", "application/json"), ("Content-Encoding", "gzip")))
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner's first claim request")
    # The pooled runner's peak so far may be an earlier test's: start from its memory now.
    Path(f"/proc/{runner.process.pid}/clear_refs").write_text("5")
    before = peak_memory(runner.process.pid)
    offer_and_wait_for_next_poll(runner, bomb, "a gzip bomb of 512 MiB", timeout=60)
    grown = peak_memory(runner.process.pid) - before
    assert grown < 256 * 1024 ** 2, f"the runner's peak memory grew by {grown // 1024 ** 2} MiB"
    site.assert_unharmed()


@pytest.mark.shared_runner
def test_claim_redirected_to_another_server_does_not_carry_the_token(site):
    """A registry that redirects the claim elsewhere must not get the site's token, or anything, sent there:
    the runner follows no redirect at all."""
    elsewhere = site.extra_registry()
    runner = site.start_runner()
    offer_and_wait_for_next_poll(runner, redirect(f"{elsewhere.url}/api/site/claim"), "a redirect to another port")
    # The runner has asked the real registry again since the redirect: had it followed, it would have by now.
    assert elsewhere.requests() == []
    site.assert_unharmed()


@pytest.mark.shared_runner
def test_deeply_nested_heartbeat_answer(site, probe):
    """A heartbeat answered with JSON nested too deep to parse is a malformed answer like any other."""
    runner = site.start_runner()
    site.registry.script("heartbeat", Answer.text(NESTED_JSON, content_type="application/json"), run_id=701)
    site.registry.script("input", Answer.text(json.dumps({"sleep": 4})), run_id=701)
    site.registry.offer_claim(claim(701, probe, lease_seconds=3))
    runner.wait_for(lambda: len(site.registry.requests("heartbeat", run_id=701)) >= 2,
                    "the runner beats again after the nested answer", timeout=10)
    report = wait_for_finish(runner, 701)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    site.assert_unharmed(allowed_runs=[701])


# --- 3. persisted state ----------------------------------------------------------------------

def write_run_folder(work_dir, name, state):
    folder = work_dir / "runs" / name
    folder.mkdir(parents=True)
    (folder / "state.json").write_bytes(state if isinstance(state, bytes) else json.dumps(state).encode())


def test_hostile_run_folders_are_set_aside_once(site, probe):
    """Run folders whose state.json does not validate, or names another run, are moved to work_dir/set-aside/
    with a log line at start; the runner then takes new claims, and a second start does not see them."""
    hostile = {
        "7": b"not json {",
        "8": {"run": claim(9, probe)},  # names another run
        "10": {"run": claim(10, probe, session_id="../../x"), "container_id": "x"},
        "11": {"run": claim(11, probe, id="../../x")},
        "12": {"run": claim(12, probe, lease_id="a/b\r\n")},
        "13": [],
        "14": {"run": claim(14, probe, session_id=str(site.absolute_target))},
        "15": b"\xff\xfe\x00 not utf-8",
        "016": {"run": claim(16, probe)},  # run 16's state, under another name
        "abc": {"run": claim(17, probe)},
    }
    for name, state in hostile.items():
        write_run_folder(site.work_dir, name, state)
    first = site.start_runner()
    first.wait_for(lambda: site.registry.requests("claim"), "the runner polls after setting the folders aside")
    site.assert_unharmed()
    for name in hostile:
        assert f"run folder {site.work_dir / 'runs' / name} is not a run this runner can carry on with" in first.output
    assert list((site.work_dir / "runs").iterdir()) == []
    aside = {path.name.rsplit("-", 1)[0]: path for path in (site.work_dir / "set-aside").iterdir()}
    assert set(aside) == set(hostile)
    kept = listing(site.work_dir / "set-aside", [])

    site.registry.offer_claim(claim(801, OFF_WHITELIST))
    first.wait_for(lambda: site.registry.requests("refuse", run_id=801), "the runner takes a new claim")
    assert {request.run_id for request in site.registry.requests() if request.run_id} == {"801"}
    site.assert_unharmed()
    assert first.stop() == 0

    second = site.start_runner()
    site.registry.offer_claim(claim(802, OFF_WHITELIST))
    second.wait_for(lambda: site.registry.requests("refuse", run_id=802), "the second runner takes a new claim")
    assert "is not a run this runner can carry on with" not in second.output
    assert listing(site.work_dir / "set-aside", []) == kept
    site.assert_unharmed()
    assert second.stop() == 0


# --- 4. identity -------------------------------------------------------------------------------

IDENTITY_PROBLEMS = {
    "a wrong token": dict(me=Answer.json({"message": "unknown token"}, status=401), words=(TOKEN_REFUSED,)),
    "a researcher's token": dict(me=Answer.json({"message": "sites only"}, status=403), words=(TOKEN_REFUSED,)),
    "a revoked token": dict(claim=Answer.json({"message": "revoked"}, status=401), words=(TOKEN_REFUSED,)),
    "another site's token": dict(me=Answer.json({"id": 2, "name": "hospital-other"}),
                                 words=("'hospital-other'", f"'{SITE}'")),
    "another site's token, its name full of escapes": dict(
        me=Answer.json({"id": 2, "name": "\x1b[2J\rhospital-\u202eother\n"}), words=("hospital-", f"'{SITE}'")),
}


@pytest.mark.parametrize("once", [True, False], ids=["once", "long-running"])
@pytest.mark.parametrize("problem", IDENTITY_PROBLEMS)
def test_a_token_that_is_not_this_sites_own_stops_the_runner_with_one_line(site, problem, once):
    scripted = IDENTITY_PROBLEMS[problem]
    if "me" in scripted:
        site.registry.defaults["me"] = scripted["me"]
    if "claim" in scripted:
        site.registry.defaults["claim"] = scripted["claim"]
    runner = site.start_runner(*(["--once"] if once else []))

    exit_code = runner.wait_for_exit(f"the runner stops for {problem}", timeout=60)
    assert exit_code not in (0, None)
    assert b"Traceback" not in runner.raw_output
    naming = lines_naming(runner.stderr_lines, *scripted["words"])
    assert len(naming) == 1, f"lines naming the problem: {naming}\nall of stderr:\n{runner.output}"
    assert naming == runner.stderr_lines[-1:] and not LOG_RECORD.match(naming[0])
    assert "site_token" in naming[0] or "site_name" in naming[0]  # names the fix
    claims = site.registry.requests("claim")
    assert len(claims) == (1 if "claim" in scripted else 0)  # nothing claimed after the token was refused
    site.assert_unharmed(exited=[runner])


def test_an_older_registry_without_me_is_warned_about(site):
    site.registry.defaults["me"] = Answer.json({"message": "not found"}, status=404)
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner goes on to claim")
    assert "cannot say which site this token belongs to" in runner.output
    site.assert_unharmed()
    assert runner.stop() == 0


def test_a_registry_that_cannot_say_who_we_are_is_asked_again(site):
    """me answering 5xx or garbage: the runner asks again every poll interval, then goes on."""
    site.registry.script("me", Answer.json({"message": "\x1b[2Jdown\r"}, status=503), Answer.json([]),
                         Answer.text("not json"), Answer.json({"name": 5}))
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner claims once the registry says who it is",
                    timeout=40)
    assert len(site.registry.requests("me")) == 5
    site.assert_unharmed()
    assert runner.stop() == 0


def test_deeply_nested_identity_answer_is_asked_again(site):
    """me answered with JSON nested too deep to parse: a registry problem like any other answer that is not
    a site's identity, not a crash at every start."""
    site.registry.script("me", Answer.text(NESTED_JSON, content_type="application/json"))
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner claims once the registry says who it is")
    assert len(site.registry.requests("me")) == 2
    site.assert_unharmed()
    assert runner.stop() == 0


# --- 5. more an attacker would try ---------------------------------------------------------------

def test_a_run_handed_out_again_while_it_runs(site, probe):
    """The same run id claimed again with a new lease while its container runs: the old one is stopped and
    never reported, the new one runs to its end, and nothing of either lands outside work_dir."""
    runner = site.start_runner(max_concurrent_runs=2)
    site.registry.script("input", Answer.text(json.dumps({"sleep": 60})), run_id=901)
    site.registry.offer_claim(claim(901, probe, lease_id="first-lease"))
    runner.wait_for(lambda: algorithm_running(site, 901), "the first claim's container runs")
    site.registry.offer_claim(claim(901, probe, lease_id="second-lease"))

    report = wait_for_finish(runner, 901, timeout=60)
    assert (report["lease_id"], report["exit_code"], report["failure_reason"]) == ("second-lease", 0, None)
    for request in site.registry.requests(run_id=901):
        if request.kind in ("output", "log", "finish"):
            assert "first-lease" not in (request.headers.get("X-Lease-Id"), (request.json or {}).get("lease_id"))
    assert "the registry handed the run out again" in runner.output
    runner.wait_for(lambda: not algorithm_containers(SITE, site.work_dir), "both runs' containers are removed")
    site.assert_unharmed(allowed_runs=[901])
    assert runner.stop() == 0


def algorithm_running(site, run_id):
    """Whether the run's algorithm container (not its relay) is running."""
    return any(container.labels[containers.RUN_LABEL] == str(run_id) and containers.ROLE_LABEL not in container.labels
               and container.status == "running"
               for container in containers.containers_of(docker.from_env(), SITE, site.work_dir))


@pytest.mark.shared_runner
def test_escapes_from_the_registry_never_reach_the_log_raw(site):
    """ANSI escapes, CR and Unicode in every field and message that reaches the log come out printable."""
    runner = site.start_runner()
    site.registry.script("refuse", Answer.json({"message": "\x1b[31mrefused\r\n2026-01-01 ERROR forged"}, status=400),
                         Answer.text(b"\x1b]0;title\x07\rraw text\r\n", status=422), run_id=1001)
    answers = [
        ("a lease with escapes", Answer.json(claim(1002, OFF_WHITELIST, lease_id="\x1b[2J\rlease"))),
        ("an image with escapes", Answer.json(claim(1001, f"{IMAGE_REGISTRY}/pht/x\x1b[2J\r\u202e"))),
        ("an id with escapes", Answer.json(claim("\x1b]0;pwned\x07\r\n", OFF_WHITELIST))),
        ("a name with escapes, off the whitelist", Answer.json(claim(1001, OFF_WHITELIST, name="\x1b[2J\r\n\u202e"))),
        ("unknown fields with escapes", Answer.json(claim(1003, OFF_WHITELIST, **{"\x1b[2J": "\r\x1b[0m"}))),
        ("a 503 with escapes", Answer.json({"message": "\x1b[2Jmaintenance\r\nforged"}, status=503)),
        ("a 418 with raw escapes", Answer.text(b"\x1b[2J\r\nI'm a teapot \xff", status=418)),
    ]
    for what, answer in answers:
        offer_and_wait_for_next_poll(runner, answer, what)
    assert len(site.registry.requests("refuse", run_id=1001)) == 2
    assert "the refusal was not recorded" in runner.output
    site.assert_unharmed()


@pytest.mark.shared_runner
def test_a_link_left_in_temp_leads_nowhere_for_a_hostile_session_id_or_a_later_task(site):
    """The issue's attack on the real engine: a task leaves /temp/escape linking to a host folder beside the
    work dir; the registry then names "<session>/temp/escape" as a session, and a later task of the session
    writes through the link. Neither reaches the host folder, and the runner chmods and mounts nothing
    through it."""
    image = pinned_test_image("temp-symlink")
    host_folder = site.root / "site" / "x"  # a canary folder, 0700, beside the work dir
    runner = site.start_runner()
    site.registry.script("input", Answer.text(json.dumps({"links": {"escape": str(host_folder)}})), run_id=951)
    site.registry.offer_claim(claim(951, image, session_id=950))
    assert wait_for_finish(runner, 951, timeout=60)["exit_code"] == 0

    site.registry.offer_claim(claim(952, image, session_id="950/temp/escape"))
    site.registry.script("input", Answer.text("{}"), run_id=953)
    site.registry.offer_claim(claim(953, image, session_id=950))
    assert wait_for_finish(runner, 953, timeout=60)["exit_code"] == 0

    [refusal] = site.registry.bodies("refuse", run_id=952)
    assert refusal["reason"].startswith(f"{REFUSED} session_id"), refusal
    # The later task found the link in its session's /temp, and it led nowhere: the host folder is not in
    # the container's view, and the container's own filesystem is read-only.
    [upload] = site.registry.requests("output", run_id=953)
    with tarfile.open(fileobj=io.BytesIO(upload.body), mode="r:gz") as archive:
        tried = json.load(archive.extractfile("tried.json"))
    assert list(tried) == ["escape"] and tried["escape"].startswith("failed"), tried
    site.assert_unharmed(allowed_runs=[951, 953])  # host_folder: same mode, owner and files as before



def test_a_registry_that_lies_about_closed_sessions_removes_no_more_than_this_sites_own_session_folders(site, probe):
    """Asked which of its sessions are closed, the registry answers with ids never asked about, paths, and
    garbage: the runner removes the one folder it asked about and was told of, and nothing else."""
    runner = site.start_runner()
    for run_id in (961, 962):
        site.registry.offer_claim(claim(run_id, probe, session_id=run_id))
        assert wait_for_finish(runner, run_id, timeout=60)["exit_code"] == 0
    sessions = site.work_dir / "sessions"
    assert sorted(path.name for path in sessions.iterdir()) == ["961", "962"]
    asked = len(site.registry.requests("closed-sessions"))
    site.registry.script("closed-sessions", Answer.text("not json"), Answer.json({"closed": "all"}),
                         Answer.json({"message": "down"}, status=500), Answer.text("[" * 100_000 + "]" * 100_000),
                         Answer.json({"closed": ["../x", -1, 2 ** 40, "961/../..", 1.5, None, True, 962, 5]}))
    runner.wait_for(lambda: len(site.registry.requests("closed-sessions")) >= asked + 5,
                    "the runner asks five more times which sessions are closed", timeout=60)
    runner.wait_for_log("session 962: removed its /temp (the researcher closed the session)", "962 is removed")
    assert sorted(path.name for path in sessions.iterdir()) == ["961"]
    runner.wait_for(lambda: site.registry.bodies("closed-sessions")[-1] == {"session_ids": [961]},
                    "the runner asks about the session it still holds, and only that one")
    assert disk_limits.mounted_under(sessions) == [str(sessions / "961" / "temp")]
    site.assert_unharmed(allowed_runs=[961, 962])
    assert runner.stop() == 0


def test_a_run_handed_out_again_while_it_waits_gets_none_of_the_officers_decisions(site, probe):
    """The site approves every task. While run 971 waits, the registry hands it out again, with other input: that
    claim is refused, and the officer's approval goes to the claim they were shown. Handed out once more after it
    ran, the same image and input wait again: an approval of one claim is not one of the run id."""
    runner = site.start_runner(approval_policy="approve_every_task")
    site.registry.script("input", Answer.text(b"the input shown to the officer",
                                              content_type="application/octet-stream"), run_id=971)
    site.registry.offer_claim(claim(971, probe, lease_id="first"))
    runner.wait_for(lambda: site.registry.bodies("park", run_id=971), "run 971 waits for approval")
    offer_and_wait_for_next_poll(runner, claim(971, probe, lease_id="second"), "run 971 handed out again")
    [refusal] = site.registry.bodies("refuse", run_id=971)
    assert refusal["lease_id"] == "second"
    assert "run 971 is awaiting_approval at this site under an earlier claim" in refusal["reason"]

    config = load_site_config(runner.config_path)
    officer = Officer(config, by="it-officer", out=lambda line: None)
    officer.approve(971)
    report = wait_for_finish(runner, 971, timeout=60)
    assert report["lease_id"] == "first" and report["exit_code"] == 0
    assert site.registry.bodies("resume", run_id=971) == [{"lease_id": "first"}]

    site.registry.offer_claim(claim(971, probe, lease_id="third"))
    runner.wait_for(lambda: len(site.registry.bodies("park", run_id=971)) == 2, "run 971 waits for approval again")
    assert site.registry.bodies("park", run_id=971)[-1]["lease_id"] == "third"
    site.assert_unharmed(allowed_runs=[971])
    assert runner.stop() == 0


def test_a_run_the_registry_says_it_started_skips_no_approval(site, probe):
    """The site approves every task, so its claims never ask the registry to start a run (start_pinned, API 1.6).
    A registry that answers "started" anyway has the run fail at the site before anything of it runs: no start
    report, no park, no container, and no approval skipped."""
    runner = site.start_runner(approval_policy="approve_every_task")
    site.registry.offer_claim(claim(981, probe, started=True))
    report = wait_for_finish(runner, 981, timeout=60)
    assert report["exit_code"] is None
    assert "approval policy (approve_every_task)" in report["failure_reason"], report
    assert not site.registry.requests("start", run_id=981) and not site.registry.requests("park", run_id=981)
    assert not any("start_pinned" in body for body in site.registry.bodies("claim"))
    site.assert_unharmed(allowed_runs=[])
    assert runner.stop() == 0


def test_a_site_that_needs_no_approval_has_its_claims_start_pinned_runs(site, probe):
    """Under the whitelist policy the runner asks its claims to start a run once the registry's answers say it can
    (a "started" field: an older registry refuses a claim that asks), and reports no start for a run so started."""
    runner = site.start_runner()
    site.registry.offer_claim(claim(982, probe, started=False))
    assert wait_for_finish(runner, 982, timeout=60)["exit_code"] == 0
    assert site.registry.requests("start", run_id=982), "a run its claim did not start was not reported started"
    assert not any("start_pinned" in body for body in site.registry.bodies("claim")[:1])
    runner.wait_for(lambda: site.registry.bodies("claim")[-1].get("start_pinned") is True,
                    "the runner asks its claims to start pinned runs")
    site.registry.offer_claim(claim(983, probe, started=True))
    report = wait_for_finish(runner, 983, timeout=60)
    assert (report["exit_code"], report["failure_reason"]) == (0, None)
    assert not site.registry.requests("start", run_id=983), "a run its claim started was reported started again"
    site.assert_unharmed(allowed_runs=[982, 983])
    assert runner.stop() == 0


# Last of the pooled runner's tests, since it stops the runner (a test run after it would start another).
@pytest.mark.shared_runner
def test_a_claim_answer_that_trickles_does_not_keep_the_runner_from_stopping(site):
    """long_poll_seconds is "also the longest a stop signal waits for the runner to notice it"
    (docs/site-config.md): a claim answered a byte at a time, without end, must not hold it past a SIGTERM."""
    runner = site.start_runner()
    runner.wait_for(lambda: site.registry.requests("claim"), "the runner's first claim request")
    label = site.registry.offer_claim(Answer.trickle(), label="an answer that trickles without end")
    runner.wait_for(lambda: any(request.served == label for request in site.registry.requests("claim")),
                    "the runner gets the trickling answer")
    runner.process.send_signal(signal.SIGTERM)
    assert runner.wait_for_exit("one SIGTERM while a claim answer trickles", timeout=10) == 0
    site.assert_unharmed(exited=[runner])
