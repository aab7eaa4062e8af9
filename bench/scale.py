"""Scale benchmark: many simulated sites against the registry on this machine, as one process or several.

    .venv/bin/python -m bench.scale [--sites 250 500 1000 2000] [--seconds 20] [--rate 50]
        [--database-url URL] [--replicas N [--balancer]] [--idle-seconds 30]

Each simulated site is a greenlet that does what a runner does over HTTP, without containers: long-poll for a
run (which carries the small input and is started with the claim, its image being pinned by digest as the
researcher library posts it), and report it finished with its small output and log. A registry before API 1.6
cannot start a claimed run, so the site reports the start; before 1.4 it uploads output and log by requests of
their own. It sends no heartbeat: a runner's first comes a third of the lease after the start, and these runs
end at once. A poster sends tasks to random sites at --rate per second. For each site count it prints tasks
dispatched per second, dispatch latency (POST sent -> the site holds the run: median, p95), the registry's RSS
and CPU (of all its replicas together), and its CPU milliseconds per dispatched run, the poster's post and the
site's reports included. Targets at 1,000 sites: p95 < 250 ms, RSS < 500 MB. The simulated sites share the
machine's two cores with the registry, so the figures are pessimistic for the registry.

With --replicas N (PostgreSQL only: --database-url), N registry processes share the database, each with
its own data folder. Without --balancer the sites are spread over the replicas and the poster posts to
the first: the table then also gives the p95 of sites on another replica than the poster's (their
wake-up comes through PostgreSQL's NOTIFY). With --balancer, sites and poster all go through HAProxy
(scripts/balancer.py) in front of the replicas.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import collections  # noqa: E402
import hashlib  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import sqlalchemy as sa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
from master import store  # noqa: E402
from scripts.balancer import Balancer  # noqa: E402
from scripts.federation import free_port, register_directly, wait_until_answers  # noqa: E402

LONG_POLL_SECONDS = 50  # the site runner's default
POLL_INTERVAL_SECONDS = 5  # the site runner's default, also its wait after a failed claim
SMALL_RESULT = b"{}" * 256
SMALL_RESULT_SHA256 = hashlib.sha256(SMALL_RESULT).hexdigest()
SMALL_RESULT_BASE64 = base64.b64encode(SMALL_RESULT).decode()
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class SimulatedSite:
    def __init__(self, url, token, claimed_at, stop, long_poll_seconds=LONG_POLL_SECONDS):
        self.url, self.claimed_at, self.stop = url, claimed_at, stop
        self.long_poll_seconds = long_poll_seconds
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=1)
        self.http.mount("http://", adapter)
        self.errors = collections.Counter()
        self.starts_claimed_runs = False

    def work(self):
        while not self.stop[0]:
            try:
                # Asked once the registry's claims say it can (as the runner does): an older one refuses the field.
                asked = {"start_pinned": True} if self.starts_claimed_runs else {}
                response = self.http.post(f"{self.url}/api/site/claim", timeout=self.long_poll_seconds + 30,
                                          json={"wait_seconds": self.long_poll_seconds, **asked})
                if response.status_code == 204:
                    continue
                response.raise_for_status()
                run = response.json()
                # Joined with the post times afterwards: the run may arrive before the poster has
                # even read the task id from its own response.
                self.claimed_at[run["task_id"]] = time.monotonic()
                self.starts_claimed_runs = "started" in run
                self.report(run)
            except requests.RequestException as error:
                self.errors[type(error).__name__ if error.response is None else error.response.status_code] += 1
                gevent.sleep(POLL_INTERVAL_SECONDS)  # as a runner does after a claim that failed

    def report(self, run):
        base = f"{self.url}/api/site/runs/{run['id']}"
        lease = {"lease_id": run["lease_id"]}
        if not run.get("started"):
            self.http.post(f"{base}/start", json={**lease, "image_digest": "sha256:" + "0" * 64},
                           timeout=60).raise_for_status()
        carried = {}
        for kind in ("output", "log"):
            if len(SMALL_RESULT) <= run.get("inline_result_bytes", 0):
                carried[f"{kind}_base64"] = SMALL_RESULT_BASE64
            else:
                self.http.put(f"{base}/{kind}", data=SMALL_RESULT, timeout=60, headers={
                    "X-Lease-Id": run["lease_id"], "X-Content-SHA256": SMALL_RESULT_SHA256}).raise_for_status()
        self.http.post(f"{base}/finish", json={**lease, "exit_code": 0, **carried}, timeout=60).raise_for_status()


def start_registries(count, database_url, folder, site_count=0):
    """count registry processes on database_url, each with its own data folder: [(process, url)]. Each takes
    a connection from every one of site_count sites and more, as an operator with that many sets it up."""
    started = []
    for number in range(count):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(folder / f"replica-{number}"),
             "--database-url", database_url, "serve", "--host", "127.0.0.1", "--port", str(port),
             # Every simulated site (and the balancer) comes from 127.0.0.1: no cap on idle connections per address.
             "--max-idle-per-address", "0",
             # Every site holds a connection (a parked long-poll): the default cap, 10,000, is below 10,000 and a
             # poster.
             "--max-connections", str(max(10_000, site_count + 1000))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append((process, f"http://127.0.0.1:{port}"))
        wait_until_answers(f"http://127.0.0.1:{port}/health", process, "the registry")
    return started


def measure(site_count, seconds, rate, database_url, folder, replica_count=1, balanced=False, idle_seconds=0,
            long_poll_seconds=LONG_POLL_SECONDS):
    data_dir = folder / f"registry-{site_count}"
    data_dir.mkdir()
    database_url = database_url or f"sqlite:///{data_dir / 'registry.sqlite'}"
    if database_url.startswith("postgresql"):
        engine = sa.create_engine(database_url)
        store.metadata.drop_all(engine)
        engine.dispose()
    registries = start_registries(replica_count, database_url, data_dir, site_count)
    balancer = None
    try:
        if balanced:
            balancer = Balancer(data_dir / "balancer", f"127.0.0.1:{free_port()}",
                                [url.removeprefix("http://") for _, url in registries]).start()
            wait_until_answers(balancer.url + "/health", balancer.process, "the balancer")
            poster_url = balancer.url
        else:
            poster_url = registries[0][1]
        site_tokens = register_directly(database_url, store.SITE, [f"site-{i:05d}" for i in range(site_count)])
        researcher = register_directly(database_url, store.RESEARCHER, ["bench"])["bench"]
        posted_at, claimed_at, stop = {}, {}, [False]
        # Without a balancer, site i polls replica i mod N.
        sites = [SimulatedSite(balancer.url if balanced else registries[i % replica_count][1], token, claimed_at, stop,
                               long_poll_seconds) for i, token in enumerate(site_tokens.values())]
        remote_names = {name for i, name in enumerate(site_tokens) if not balanced and i % replica_count}
        workers = [gevent.spawn(site.work) for site in sites]
        gevent.sleep(3 + site_count / 500)  # every site has made its first claim and is parked
        poster = requests.Session()
        poster.headers["Authorization"] = f"Bearer {researcher}"
        names = list(site_tokens)
        pids = [process.pid for process, _ in registries]
        # Parked sites only, renewing their long-polls: what an idle consortium costs the registry.
        idle_cpu_before = sum(map(cpu_seconds, pids))
        gevent.sleep(idle_seconds)
        idle_cpu = sum(map(cpu_seconds, pids)) - idle_cpu_before
        idle_cpu_share = idle_cpu / idle_seconds if idle_seconds else float("nan")
        cpu_before, started = sum(map(cpu_seconds, pids)), time.monotonic()
        peak_rss = sum(map(rss_mb, pids))
        posted, remote_tasks = 0, set()
        while time.monotonic() - started < seconds:
            sent = time.monotonic()
            name = random.choice(names)
            response = poster.post(f"{poster_url}/api/tasks", timeout=60, json={
                "image": "bench/scale:1@sha256:" + "0" * 64, "input": "{}", "sites": [name]})
            response.raise_for_status()
            posted_at[response.json()["id"]] = sent
            if name in remote_names:
                remote_tasks.add(response.json()["id"])
            posted += 1
            peak_rss = max(peak_rss, sum(map(rss_mb, pids)))
            gevent.sleep(max(0.0, started + posted / rate - time.monotonic()))
        deadline = time.monotonic() + 30
        while len(claimed_at) < posted and time.monotonic() < deadline:
            gevent.sleep(0.1)
        elapsed = max(claimed_at.values(), default=time.monotonic()) - started
        cpu_used = sum(map(cpu_seconds, pids)) - cpu_before
        cpu_share = cpu_used / elapsed
        stop[0] = True
        gevent.killall(workers, timeout=10)
    finally:
        if balancer is not None:
            balancer.stop()
        for process, _ in registries:
            process.terminate()
            process.wait(timeout=10)
    latencies = {task: claimed_at[task] - posted_at[task] for task in claimed_at if task in posted_at}
    remote = [latency for task, latency in latencies.items() if task in remote_tasks]
    return {
        "sites": site_count, "posted": posted, "dispatched": len(latencies),
        "per_second": len(latencies) / elapsed,
        "median_ms": statistics.median(latencies.values()) * 1000 if latencies else float("nan"),
        "p95_ms": p95(latencies.values()) * 1000, "remote_p95_ms": p95(remote) * 1000,
        "rss_mb": peak_rss, "cpu_percent": cpu_share * 100, "idle_cpu_percent": idle_cpu_share * 100,
        "cpu_ms_per_run": cpu_used * 1000 / len(latencies) if latencies else float("nan"),
        "errors": dict(sum((site.errors for site in sites), collections.Counter())),
    }


def p95(latencies):
    ordered = sorted(latencies)
    return ordered[int(0.95 * (len(ordered) - 1))] if ordered else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[250, 500, 1000, 2000])
    parser.add_argument("--seconds", type=float, default=20, help="how long tasks are posted per site count")
    parser.add_argument("--rate", type=float, default=50, help="tasks posted per second")
    parser.add_argument("--database-url", default="", help="default: a fresh SQLite file per site count")
    parser.add_argument("--replicas", type=int, default=1, help="registry processes (PostgreSQL only)")
    parser.add_argument("--balancer", action="store_true", help="sites and poster go through HAProxy")
    parser.add_argument("--idle-seconds", type=float, default=0,
                        help="first measure the registry's CPU this long with every site parked and no task")
    parser.add_argument("--long-poll-seconds", type=int, default=LONG_POLL_SECONDS,
                        help="how long each site's claim waits (default: the site runner's default)")
    args = parser.parse_args()
    if args.replicas > 1 and not args.database_url.startswith("postgresql"):
        parser.error("--replicas needs --database-url postgresql+psycopg://...: replicas share one database")
    print(f"{args.replicas} replica(s){', through HAProxy' if args.balancer else ''}")
    print(f"{'sites':>6} {'posted':>7} {'dispatched':>10} {'per s':>7} {'median ms':>10} {'p95 ms':>8} "
          f"{'remote p95':>10} {'RSS MB':>7} {'CPU %':>6} {'CPU ms/run':>10} {'idle CPU %':>10} {'errors':>6}")
    with tempfile.TemporaryDirectory(prefix="pht-scale-") as folder:
        for site_count in args.sites:
            r = measure(site_count, args.seconds, args.rate, args.database_url, Path(folder), args.replicas,
                        args.balancer, args.idle_seconds, args.long_poll_seconds)
            print(f"{r['sites']:>6} {r['posted']:>7} {r['dispatched']:>10} {r['per_second']:>7.1f} "
                  f"{r['median_ms']:>10.1f} {r['p95_ms']:>8.1f} {r['remote_p95_ms']:>10.1f} {r['rss_mb']:>7.1f} "
                  f"{r['cpu_percent']:>6.0f} {r['cpu_ms_per_run']:>10.1f} {r['idle_cpu_percent']:>10.1f} "
                  f"{sum(r['errors'].values()):>6} "
                  f"{r['errors'] or ''}", flush=True)


if __name__ == "__main__":
    main()
