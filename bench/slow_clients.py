"""Slow clients benchmark: a Slowloris attack on the registry while thousands of sites long-poll.

    .venv/bin/python -m bench.slow_clients [--sites 2000] [--slow 1000] [--attack-addresses 1]
                                           [--open-files 2600] [--probe-seconds 10] [--header-seconds 10]

Every simulated site long-polls (POST /api/site/claim, wait_seconds 60) from its own loopback address
(127.1.x.y), as real sites each come from theirs; the researcher posts from 127.0.0.1 on one kept-alive
connection, /health is asked from 127.3.0.1, the attack comes from --attack-addresses addresses
(127.2.x.y). Two phases, measured alike:

- quiet: every site waits in its long-poll. /health is asked on a new connection every 50 ms for
  --probe-seconds; then one task for every site is posted, and each site's long-poll answers with its
  run (then it polls again). /health is not asked meanwhile: the 2,000 claims that one task sets off
  keep the single registry process busy for seconds, attack or not.
- attack: --slow connections each send "GET /health HTTP/1.1", "Host: x" and then a header byte every
  2 s, never finishing; one the server closes or refuses is opened again 2 s later (Slowloris keeps its
  count up). Once the first wave is 2 s past the header deadline, the same measurements as above.

Printed per phase: /health latency over all probes (a failed probe counts with the time it took) and
the failures; how many sites got their run, and from the POST to each site holding it (median, p95,
max); the registry's open files at most. For the attack: how many of the first wave the server still
held 2 s after the header deadline, the longest any slow connection was held (from the client's
connect to its seeing the close), and how each ended.

Why --open-files 2600 (soft and hard, so that the registry cannot raise it): 2,000 sites take 2,000
descriptors and the registry ~50 more for itself, so a limit that leaves room for them but not for the
attack's 1,000 as well is the situation of the original report (420 slow connections against a limit of
400). A server that holds every slow connection then has no descriptor left for /health; one that
caps and cuts them has. 0 keeps the limit the registry sets itself (its hard limit).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import sqlalchemy as sa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
from master import store  # noqa: E402
from scripts.federation import free_port, register_directly, wait_until_answers  # noqa: E402

LONG_POLL_SECONDS = 60  # the most a claim may wait
SLOW_REQUEST_START = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "
TRICKLE_SECONDS = 2
PROBE_EVERY_SECONDS = 0.05
PROBE_TIMEOUT_SECONDS = 5
DISPATCH_TIMEOUT_SECONDS = 120
SITES_BLOCK, ATTACK_BLOCK, PROBE_ADDRESS, RESEARCHER_ADDRESS = 1, 2, "127.3.0.1", "127.0.0.1"


def loopback_address(block, index):
    return f"127.{block}.{index // 250}.{index % 250 + 1}"


def percentile(ordered, share):
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def open_files(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class LongPollingSite:
    """A site runner's long-poll from its own address: claim, and once it holds a run, claim again."""

    def __init__(self, port, token, address, claimed):
        self.port, self.address, self.claimed = port, address, claimed
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.body = json.dumps({"wait_seconds": LONG_POLL_SECONDS})
        self.errors = collections.Counter()
        self.connection = None
        self.claims_sent = 0

    def poll_forever(self):
        while True:
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=LONG_POLL_SECONDS + 30,
                                                                 source_address=(self.address, 0))
                self.claims_sent += 1
                self.connection.request("POST", "/api/site/claim", self.body, self.headers)
                response = self.connection.getresponse()
                answer = response.read()
                if response.status == 200:
                    self.claimed[json.loads(answer)["task_id"]].append(time.monotonic())
                elif response.status != 204:
                    raise http.client.HTTPException(f"status {response.status}")
                if response.will_close:
                    self._disconnect()
            except (OSError, http.client.HTTPException) as error:
                self.errors[str(error) if isinstance(error, http.client.HTTPException) else type(error).__name__] += 1
                self._disconnect()
                gevent.sleep(1)  # a runner backs off too

    def _disconnect(self):
        if self.connection is not None:
            self.connection.close()
        self.connection = None


class SlowClient:
    """Slowloris: a request that never finishes its headers; one the server closes or refuses is opened again
    at the next round, TRICKLE_SECONDS later (opening it again at once would be a connection flood instead,
    an attack on CPU that a firewall's rate limit answers, not the server)."""

    def __init__(self, port, address, held):
        self.port, self.address, self.held = port, address, held
        self.first_connection_ended = False

    def attack(self, stop):
        while not stop.is_set():
            opened = time.monotonic()
            try:
                connection = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                                      source_address=(self.address, 0))
            except OSError:
                outcome = "not connected"
            else:
                outcome = self._hold(connection, stop)
                connection.close()
            self.held.append((opened, time.monotonic(), outcome))
            self.first_connection_ended = True
            stop.wait(TRICKLE_SECONDS)

    def _hold(self, connection, stop):
        try:
            connection.sendall(SLOW_REQUEST_START)
        except OSError:
            return "closed"
        connection.settimeout(TRICKLE_SECONDS)
        answer = b""
        while not stop.is_set():
            try:
                data = connection.recv(4096)
            except socket.timeout:
                try:
                    connection.send(b"a")
                except OSError:
                    return "closed"
                continue
            except OSError:
                return "closed"
            if not data:
                return "503" if answer.startswith(b"HTTP/1.1 503 ") else "closed"
            answer += data
        return "still open"


class Phase:
    """The registry's open files at most, from start() until stop(); /health probes for probe(seconds)."""

    def __init__(self, port, registry_pid):
        self.port, self.registry_pid = port, registry_pid
        self.probes = []  # (seconds, status or error)
        self.most_open_files = 0
        self._stop = gevent.event.Event()
        self._counter = None

    def start(self):
        self._counter = gevent.spawn(self._count_open_files)

    def stop(self):
        self._stop.set()
        self._counter.join()

    def probe(self, seconds):
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=PROBE_TIMEOUT_SECONDS,
                                                    source_address=(PROBE_ADDRESS, 0))
            try:
                connection.request("GET", "/health")
                response = connection.getresponse()
                response.read()
                outcome = response.status
            except (OSError, http.client.HTTPException) as error:
                outcome = type(error).__name__
            finally:
                connection.close()
            self.probes.append((time.monotonic() - started, outcome))
            gevent.sleep(max(0.0, started + PROBE_EVERY_SECONDS - time.monotonic()))

    def _count_open_files(self):
        while not self._stop.is_set():
            self.most_open_files = max(self.most_open_files, open_files(self.registry_pid))
            self._stop.wait(0.5)


class Researcher:
    """Posts a task for every site on one kept-alive connection, opened while the registry is quiet."""

    def __init__(self, port, token):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60,
                                                     source_address=(RESEARCHER_ADDRESS, 0))
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post_task_for_every_site(self):
        self.connection.request("POST", "/api/tasks", json.dumps({"image": "bench/slow-clients:1", "input": "{}"}),
                                self.headers)
        response = self.connection.getresponse()
        answer = response.read()
        if response.status != 201:
            raise SystemExit(f"posting the task failed: {response.status} {answer[:200]!r}")
        return json.loads(answer)["id"]


def dispatch(researcher, claimed, site_count):
    """Post one task for every site; the seconds from the POST to each site holding its run."""
    posted = time.monotonic()
    task_id = researcher.post_task_for_every_site()
    deadline = posted + DISPATCH_TIMEOUT_SECONDS
    while len(claimed[task_id]) < site_count and time.monotonic() < deadline:
        gevent.sleep(0.1)
    return sorted(at - posted for at in claimed[task_id])


def sites_polling_since(engine, wall_time):
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).where(store.sites.c.last_seen_at > wall_time))


def wait_for_sites(engine, wall_time, site_count, what):
    deadline = time.monotonic() + 120
    while sites_polling_since(engine, wall_time) < site_count:
        if time.monotonic() > deadline:
            raise SystemExit(f"not within 120 s: {what} ({sites_polling_since(engine, wall_time)} of {site_count})")
        gevent.sleep(0.2)


def wait_for_new_claims(sites, sent_before):
    deadline = time.monotonic() + 120
    while any(site.claims_sent <= before for site, before in zip(sites, sent_before)):
        if time.monotonic() > deadline:
            raise SystemExit("not within 120 s: every site long-polls again after its run")
        gevent.sleep(0.05)


def phase_row(name, phase, latencies, site_count):
    seconds = sorted(s for s, _ in phase.probes)
    failed = collections.Counter(outcome for _, outcome in phase.probes if outcome != 200)
    health = " ".join(f"{percentile(seconds, share) * 1000:>7.1f}" for share in (0.5, 0.95, 0.99, 1.0))
    dispatched = (f"{statistics.median(latencies) * 1000:>7.0f} {percentile(latencies, 0.95) * 1000:>7.0f} "
                  f"{latencies[-1] * 1000:>7.0f}" if latencies else f"{'-':>7} {'-':>7} {'-':>7}")
    return (f"{name:<7} {health} {sum(failed.values()):>4}/{len(seconds):<5} {len(latencies):>6}/{site_count:<6} "
            f"{dispatched} {phase.most_open_files:>6}  {dict(failed) or ''}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=2000)
    parser.add_argument("--slow", type=int, default=1000, help="slow connections held open at once")
    parser.add_argument("--attack-addresses", type=int, default=1, help="addresses the slow connections come from")
    parser.add_argument("--open-files", type=int, default=2600, help="the registry's open-file limit; 0: its own")
    parser.add_argument("--header-seconds", type=float, default=10, help="the registry's header deadline")
    parser.add_argument("--probe-seconds", type=float, default=10, help="how long /health is asked, in each phase")
    parser.add_argument("--registry-log", type=Path, help="keep the registry's log here (default: only its warnings "
                        "are printed)")
    args = parser.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds every client's socket

    def limit_open_files():
        if args.open_files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.open_files, args.open_files))

    with tempfile.TemporaryDirectory(prefix="pht-slow-clients-") as folder:
        database_url = f"sqlite:///{Path(folder) / 'registry.sqlite'}"
        port = free_port()
        log_path = args.registry_log or Path(folder) / "registry.log"
        with open(log_path, "wb") as log:
            registry = subprocess.Popen(
                [sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", folder, "--database-url",
                 database_url, "serve", "--host", "127.0.0.1", "--port", str(port), "--lease-seconds", "3600",
                 "--header-seconds", str(args.header_seconds)],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_open_files)
        try:
            wait_until_answers(f"http://127.0.0.1:{port}/health", registry, "the registry")
            run(args, port, registry.pid, database_url)
        finally:
            registry.terminate()
            registry.wait(timeout=30)
            lines = log_path.read_text(errors="replace").splitlines()
            warnings = [line for line in lines if " WARNING pht.wsgi" in line or " ERROR " in line]
            print("registry's log:", *warnings[:6] or ["(no connection dropped or refused)"],
                  f"({len(warnings)} such lines, {sum(line.startswith('Traceback') for line in lines)} tracebacks)",
                  sep="\n  ")


def run(args, port, registry_pid, database_url):
    tokens = register_directly(database_url, store.SITE, [f"site-{i:05d}" for i in range(args.sites)])
    researcher = Researcher(port, register_directly(database_url, store.RESEARCHER, ["bench"])["bench"])
    engine = sa.create_engine(database_url)
    claimed = collections.defaultdict(list)
    sites = [LongPollingSite(port, token, loopback_address(SITES_BLOCK, i), claimed)
             for i, token in enumerate(tokens.values())]
    print(f"slow clients: {args.sites} sites long-polling, {args.slow} slow connections from {args.attack_addresses} "
          f"address(es); registry open-file limit {args.open_files or 'its own'}, header deadline "
          f"{args.header_seconds:g} s", flush=True)
    print(f"{'':<7} {'/health, ms, and failed probes':<42} {'sites that got their run, ms':<37} registry's")
    print(f"{'phase':<7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7} {'no answer':>10} {'answered':>13} "
          f"{'median':>7} {'p95':>7} {'max':>7} {'files':>6}")

    started_wall = time.time()
    workers = [gevent.spawn(site.poll_forever) for site in sites]
    wait_for_sites(engine, started_wall, args.sites, "every site long-polls")
    quiet = Phase(port, registry_pid)
    quiet.start()
    quiet.probe(args.probe_seconds)
    sent_before = [site.claims_sent for site in sites]
    latencies = dispatch(researcher, claimed, args.sites)
    # The registry writes a site's last_seen_at only when it is news (master/sightings.py): the sites say when
    # they have claimed again.
    wait_for_new_claims(sites, sent_before)
    quiet.stop()
    print(phase_row("quiet", quiet, latencies, args.sites), flush=True)

    held, stop_attack = [], gevent.event.Event()
    slow_clients = [SlowClient(port, loopback_address(ATTACK_BLOCK, i % args.attack_addresses), held)
                    for i in range(args.slow)]
    attack = Phase(port, registry_pid)
    attack.start()
    attackers = [gevent.spawn(client.attack, stop_attack) for client in slow_clients]
    gevent.sleep(args.header_seconds + 2)
    first_wave_held = sum(not client.first_connection_ended for client in slow_clients)
    attack.probe(args.probe_seconds)
    latencies = dispatch(researcher, claimed, args.sites)
    attack.stop()
    stop_attack.set()
    gevent.joinall(attackers, timeout=TRICKLE_SECONDS + 5)
    print(phase_row("attack", attack, latencies, args.sites))

    outcomes = collections.Counter(outcome for _, _, outcome in held)
    longest = max((ended - opened for opened, ended, outcome in held), default=0.0)
    print(f"slow connections: of the first {args.slow}, still held {args.header_seconds + 2:g} s after the attack "
          f"began: {first_wave_held}; opened in all {len(held)} ({dict(outcomes)}); longest held {longest:.1f} s")
    errors = sum((site.errors for site in sites), collections.Counter())
    print(f"site long-poll errors: {dict(errors) or 'none'}")
    gevent.killall(workers, timeout=5)
    engine.dispose()


if __name__ == "__main__":
    main()
