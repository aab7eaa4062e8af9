"""SPARQL gateway overhead: an algorithm's queries through the per-run gateway against straight to the endpoint.

    .venv/bin/python -m bench.sparql_gateway [--queries 300] [--large-mb 10 100] [--repeats 5]

One Oxigraph store on 127.0.0.1 (a 1,000-patient cohort from data/generate_cohort.py, plus a bulk
cohort in a named graph, sized for the largest --large-mb answer). This process plays the site
runner: it serves a RunGateway (client/sparql_gateway.py, parsing in a ParserPool) on a Unix socket
and starts a real relay container with client/containers.py, as the runner's open_gateway() and
network_for() do. The same timing code then runs inside containers on the base image, contained as
an algorithm is (client/containers.create_contained, the site's default limits: one CPU, 2 GB), with
python3 and urllib, a new connection per query as SPARQLWrapper makes, along three paths:

    direct    network_mode host: straight to the endpoint (the baseline; see direct_network_mode())
    gateway   network_mode container:<relay>: TCP 127.0.0.1:8890 -> relay -> Unix socket -> gateway -> endpoint
    no relay  network none, the gateway's socket folder bound in: Unix socket -> gateway -> endpoint
              (not a path algorithms get; it splits the relay's cost from the gateway's)

Printed, all measured in this one run, the paths taking turns so a change in the machine's load meets
each alike:
- a small SELECT (COUNT of the cohort's patients): per-query median and p95, repeated (the gateway's
  verdict cache hits) and with a new text each time (a comment that differs, so the gateway parses it:
  its first sight of a query), the ratios to direct, and whether the aim (< 1.3x direct) is met;
  rdflib's parse alone, in this process and through the ParserPool;
- for each --large-mb size, a SELECT whose SPARQL JSON answer is about that large: median time, MB/s,
  ratio to direct, and this process's peak RSS growth while the gateway streams it (VmHWM, reset
  through /proc/self/clear_refs before each query). Aim: growth < 20 MB;
- for both, the CPU each part of the path spent per query: the algorithm's client (in its container),
  the relay, the gateway (this process's threads but the main one, which only drives Docker), the
  ParserPool's workers and the endpoint. CPU time changes less with the machine's load than wall
  time, and the parts' shares of it hardly at all: it shows where the time goes on a busy machine too.
Linux only (reads /proc). Needs the Docker engine and the base image (scripts/setup.sh). Loopback
only; no Docker network is created.
"""

import argparse
import json
import math
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import docker
import requests

ROOT = Path(__file__).resolve().parent.parent
from client import containers  # noqa: E402
from client.site_config import (CONTAINER_DEFAULTS, SPARQL_GATEWAY_DEFAULTS, ContainerLimits,  # noqa: E402
                                SparqlGatewaySettings)
from client.sparql_gateway import (CONNECTIONS_PER_RUN, ENDPOINT_IN_CONTAINER, SOCKET_NAME, QueryLog,  # noqa: E402
                                   RunGateway, Upstream, query_log_path, read_query_log)
from client.sparql_parsing import ParserPool  # noqa: E402
from client.sparql_queries import parsed_verdict  # noqa: E402
from scripts.federation import OXIGRAPH, free_port, wait_until_answers  # noqa: E402

BASE_IMAGE = SPARQL_GATEWAY_DEFAULTS["relay_base_image"]  # pht-base:bookworm
SITE = "bench-sparql-gateway"
RUN_ID = TASK_ID = 1
MB = 1024 * 1024
COHORT_PATIENTS = 1000
BULK_GRAPH = "urn:pht-bench:bulk"
TRIPLES_PER_PATIENT = 6
ROW_BYTES_GUESS = 200  # a bulk triple's row in SPARQL JSON is ~220 bytes; guessing low loads more than needed
JSON_RESULTS = "application/sparql-results+json"
WARMUP_QUERIES = 10  # per container, of the same kind as its timed ones; not timed, but in the CPU figures
ROUNDS = 5
WAYS = ("direct", "gateway", "no relay")
PARTS = ("client", "relay", "gateway", "parser", "endpoint")
CPU_HEADINGS = ("  client", "  relay", " gateway", " parser", " endpoint")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

PHT = "PREFIX pht: <http://example.org/pht/vocab#>\n"
COUNT = PHT + "SELECT (COUNT(?patient) AS ?n) WHERE { ?patient a pht:Patient }"
# Every triple of the bulk cohort, one row each: the endpoint's cheapest way to a large answer, so what
# the gateway adds to streaming shows rather than hides behind the endpoint's own work.
LARGE = "SELECT ?patient ?property ?value WHERE { GRAPH <%s> { ?patient ?property ?value } } LIMIT %%d" % BULK_GRAPH

# Runs inside the timing containers: the plan's queries in order, each on a new connection (urllib's way),
# the whole answer read and dropped. Prints {series: [[seconds, bytes, CPU seconds], ...]} as JSON.
TIMING_SCRIPT = r"""
import http.client, json, os, socket, time, urllib.parse, urllib.request

plan = json.loads(os.environ["BENCH_PLAN"])

class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(plan["unix_socket"])

class UnixHandler(urllib.request.HTTPHandler):
    def http_open(self, request):
        return self.do_open(UnixConnection, request)

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                     *([UnixHandler()] if plan["unix_socket"] else []))
measured = {}
for name, text in plan["queries"]:
    request = urllib.request.Request(plan["endpoint"] + "?" + urllib.parse.urlencode({"query": text}),
                                     headers={"Accept": plan["accept"]})
    started, cpu, size = time.perf_counter(), time.process_time(), 0
    with opener.open(request, timeout=600) as response:
        while block := response.read(1 << 20):
            size += len(block)
    measured.setdefault(name, []).append([time.perf_counter() - started, size, time.process_time() - cpu])
print(json.dumps(measured))
"""


# --- the store --------------------------------------------------------------------------------

def start_store(folder, bulk_patients):
    """Load the cohort (default graph) and the bulk cohort (named graph); serve them read-only on loopback."""
    store = folder / "oxigraph"
    for site, patients, name in (("bench", COHORT_PATIENTS, "cohort.nt"), ("bench-bulk", bulk_patients, "bulk.nt")):
        # Generated in a child process, so this process (which plays the runner) stays as lean as a runner.
        subprocess.run([sys.executable, str(ROOT / "data" / "generate_cohort.py"), "--site", site,
                        "--patients", str(patients), "--seed", "2026", "--out", str(folder / name)],
                       check=True, capture_output=True)
    subprocess.run([OXIGRAPH, "load", "--location", str(store), "--file", str(folder / "cohort.nt")],
                   check=True, capture_output=True)
    subprocess.run([OXIGRAPH, "load", "--location", str(store), "--file", str(folder / "bulk.nt"),
                    "--graph", BULK_GRAPH], check=True, capture_output=True)
    # As Oxigraph advises after a load for reading: large answers come up to twice as fast.
    subprocess.run([OXIGRAPH, "optimize", "--location", str(store)], check=True, capture_output=True)
    for name in ("cohort.nt", "bulk.nt"):
        (folder / name).unlink()
    port = free_port()
    process = subprocess.Popen([OXIGRAPH, "serve-read-only", "--location", str(store), "--bind", f"127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_answers(f"http://127.0.0.1:{port}/", process, "the SPARQL endpoint")
    return process, f"http://127.0.0.1:{port}/query"


def rows_for(endpoint, sizes_mb):
    """The LIMIT that gives an answer of about each size, from the bytes per row of a sample."""
    sample_rows = 2000
    answer = requests.get(endpoint, params={"query": LARGE % sample_rows}, headers={"Accept": JSON_RESULTS},
                          timeout=60)
    answer.raise_for_status()
    per_row = len(answer.content) / sample_rows
    return {size: max(1, round(size * MB / per_row)) for size in sizes_mb}


# --- where the CPU goes -----------------------------------------------------------------------

def process_cpu(pid):
    """User and system CPU seconds of a process, all its threads, from /proc (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds so far of each part of the path but the client (which measures its own, in its container)."""

    def __init__(self, relay_pid, endpoint_pid):
        self.relay_pid, self.endpoint_pid = relay_pid, endpoint_pid

    def snapshot(self):
        return {
            "relay": process_cpu(self.relay_pid),
            # Every thread of this process but the main one, which only drives Docker: the gateway's.
            "gateway": time.process_time() - time.thread_time(),
            "parser": sum(process_cpu(child.pid) for child in multiprocessing.active_children()),
            "endpoint": process_cpu(self.endpoint_pid),
        }


# --- the containers ---------------------------------------------------------------------------

def direct_network_mode():
    # The endpoint listens on the host's loopback, which a container reaches only in the host's network
    # namespace: a bridge would need a Docker network (this benchmark creates none, and a site's engine
    # may have no bridge) and would not reach 127.0.0.1 anyway. So the baseline, an algorithm querying
    # the endpoint with nothing in between, is one that only host networking allows (a site allows it
    # with allow_host_network, and its algorithms then bypass the gateway and all its checks).
    return "host"


def time_in_container(engine, labels, network_mode, endpoint, queries, mounts=(), unix_socket=None):
    """Run the timing script contained as an algorithm is; {series: [[seconds, bytes, CPU seconds], ...]}."""
    plan = {"endpoint": endpoint, "accept": JSON_RESULTS, "queries": queries, "unix_socket": unix_socket}
    container = containers.create_contained(engine, BASE_IMAGE, list(mounts), {"BENCH_PLAN": json.dumps(plan)},
                                            ContainerLimits(**CONTAINER_DEFAULTS), labels, network_mode,
                                            ["python3", "-c", TIMING_SCRIPT])
    try:
        container.start()
        exit_code = container.wait(timeout=1800)["StatusCode"]
        if exit_code != 0:
            raise RuntimeError(f"the timing container ({network_mode}) exited with {exit_code}: "
                               f"{container.logs(stdout=True, stderr=True).decode()[-2000:]}")
        return json.loads(container.logs(stdout=True, stderr=False))
    finally:
        container.remove(force=True)


class Series:
    """One kind of query along one path: the timed queries' seconds and bytes, and CPU seconds by part over
    every query sent (warm-ups too)."""

    def __init__(self):
        self.seconds, self.bytes, self.cpu, self.sent = [], [], Counter(), 0

    def cpu_per_query(self, part):
        return self.cpu[part] / self.sent


class Paths:
    """The three ways the timing container reaches the endpoint."""

    def __init__(self, engine, labels, endpoint, relay, socket_dir, meter):
        self.engine, self.labels, self.meter = engine, labels, meter
        self.ways = {
            "direct": dict(network_mode=direct_network_mode(), endpoint=endpoint),
            "gateway": dict(network_mode=f"container:{relay.id}", endpoint=ENDPOINT_IN_CONTAINER),
            "no relay": dict(network_mode="none", endpoint="http://gateway/sparql",
                             mounts=[(socket_dir, "/gateway", "ro")], unix_socket=f"/gateway/{SOCKET_NAME}"),
        }

    def time(self, way, queries, into):
        """Send the queries along the way; add what was measured to the Series into."""
        before = self.meter.snapshot()
        measured = time_in_container(self.engine, self.labels, queries=queries, **self.ways[way])
        after = self.meter.snapshot()
        for part in before:
            into.cpu[part] += after[part] - before[part]
        for name, entries in measured.items():
            into.sent += len(entries)
            into.cpu["client"] += sum(cpu for _seconds, _size, cpu in entries)
            if name != "warmup":
                into.seconds += [seconds for seconds, _size, _cpu in entries]
                into.bytes += [size for _seconds, size, _cpu in entries]


def in_turn(items, number):
    """The items in this round's order: each goes first in turn."""
    shift = number % len(items)
    return items[shift:] + items[:shift]


def small_plan(kind, count):
    """Warm-ups, then the timed queries: the same text each time, or a text the gateway has not seen."""
    nonce = uuid.uuid4().hex
    text = (lambda number: COUNT) if kind == "repeated" else (lambda number: f"{COUNT}\n# bench {nonce} {number}")
    return [["warmup" if number < WARMUP_QUERIES else kind, text(number)] for number in range(WARMUP_QUERIES + count)]


# --- this process's memory --------------------------------------------------------------------

def status_kb(pid, field):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


class PeakRssGrowth:
    """This process's peak RSS growth over the block, in MB: VmHWM after resetting it, else sampled VmRSS."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._sampler = None
        except OSError:
            self._stop, self._peak = threading.Event(), 0
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.before = status_kb("self", "VmRSS")
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, status_kb("self", "VmRSS"))

    def __exit__(self, *exc):
        if self._sampler is None:
            peak = status_kb("self", "VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.growth_mb, self.before_mb = max(0, peak - self.before) / 1024, self.before / 1024


# --- the run ----------------------------------------------------------------------------------

def parse_alone(count, parser):
    """Seconds to judge a query not seen before: rdflib's parse (parsed_verdict) in this process, and the same
    through the runner's ParserPool (a worker process, the text and verdict sent over a pipe)."""
    nonce, in_process, in_pool = uuid.uuid4().hex, [], []
    for number in range(count):
        for judge, timings in ((parsed_verdict, in_process), (parser.judge, in_pool)):
            text = f"{COUNT}\n# parse {nonce} {len(timings)} {number}"
            started = time.perf_counter()
            form, refusal = judge(text)
            timings.append(time.perf_counter() - started)
            assert form == "SELECT" and refusal is None, refusal
    return in_process, in_pool


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300, help="small queries per kind and path")
    parser.add_argument("--large-mb", type=float, nargs="+", default=[10, 100], help="sizes of the large answers")
    parser.add_argument("--repeats", type=int, default=5, help="large queries per size and path")
    args = parser.parse_args()

    engine = docker.from_env()
    folder = Path(tempfile.mkdtemp(prefix="pht-bench-gateway-"))
    pool, store, gateway = ParserPool(), None, None
    try:
        labels = containers.labels_for(SITE, folder, TASK_ID, RUN_ID)
        pool.start()  # as the runner does when it starts
        bulk_patients = math.ceil(max(args.large_mb) * MB / ROW_BYTES_GUESS / TRIPLES_PER_PATIENT)
        store, endpoint = start_store(folder, bulk_patients)
        limits = rows_for(endpoint, args.large_mb)

        # As the runner's open_gateway() and network_for() do: the run's gateway, then its relay.
        socket_dir = folder / "runs" / str(RUN_ID) / "gateway"
        settings = SparqlGatewaySettings(**{**SPARQL_GATEWAY_DEFAULTS, "max_queries": 1_000_000})
        query_log = QueryLog(query_log_path(folder, RUN_ID), RUN_ID, TASK_ID, settings.record_query_text)
        gateway = RunGateway(RUN_ID, TASK_ID, socket_dir, Upstream(endpoint, CONNECTIONS_PER_RUN + 1), settings,
                             query_log, socket_owner=containers.RELAY_UID, parse=pool.judge)
        gateway.open()
        relay = containers.create_relay(engine, containers.relay_image(engine, BASE_IMAGE), socket_dir, labels)
        containers.start(relay)
        containers.wait_until_listening(relay)
        relay.reload()
        paths = Paths(engine, labels, endpoint, relay, socket_dir, CpuMeter(relay.attrs["State"]["Pid"], store.pid))

        small = {(way, kind): Series() for way in WAYS for kind in ("repeated", "new text")}
        rounds = max(1, min(ROUNDS, args.queries))
        for number in range(rounds):
            share = args.queries // rounds + (1 if number < args.queries % rounds else 0)
            for way, kind in in_turn(list(small), number):
                paths.time(way, small_plan(kind, share), small[way, kind])
        parsed = parse_alone(args.queries, pool)

        large, memory = {(size, way): Series() for size in args.large_mb for way in WAYS}, {}
        paths.time("direct", [["warmup", LARGE % limits[max(args.large_mb)]]], Series())  # the store's caches
        for size in args.large_mb:
            for number in range(args.repeats):
                for way in in_turn(list(WAYS), number):
                    with PeakRssGrowth() as growth:
                        paths.time(way, [["large", LARGE % limits[size]]], large[size, way])
                    if way != "direct":
                        memory[size, way] = max(memory.get((size, way), (0, 0)), (growth.growth_mb, growth.before_mb))
        workers_mb = [status_kb(child.pid, "VmRSS") / 1024 for child in multiprocessing.active_children()]
        recorded = list(read_query_log(query_log_path(folder, RUN_ID)))
    finally:
        if gateway is not None:
            gateway.close()
        pool.close()
        for container in containers.containers_of(engine, SITE, folder):
            container.remove(force=True)
        if store is not None:
            store.terminate()
            store.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)

    sent = sum(series.sent for (way, _kind), series in small.items() if way != "direct") + \
        sum(series.sent for (_size, way), series in large.items() if way != "direct")
    report(args, rounds, small, parsed, large, memory, workers_mb, recorded, sent)


# --- the figures ------------------------------------------------------------------------------

def median_p95(values):
    ordered = sorted(values)
    return statistics.median(ordered), ordered[round(0.95 * (len(ordered) - 1))]


def cpu_columns(series, way, scale, digits):
    """CPU per query of each part the way goes through ('-' for those it does not)."""
    passed = {"direct": ("client", "endpoint"), "no relay": ("client", "gateway", "parser", "endpoint")}.get(way, PARTS)
    return " ".join(f"{series.cpu_per_query(part) * scale:{len(heading)}.{digits}f}" if part in passed
                    else f"{'-':>{len(heading)}}" for part, heading in zip(PARTS, CPU_HEADINGS))


def report(args, rounds, small, parsed, large, memory, workers_mb, recorded, sent):
    print(f"SPARQL gateway overhead: {args.queries} small queries per kind and path in {rounds} rounds, "
          f"a new connection per query, timed inside the container")
    print(f" small SELECT (COUNT of {COHORT_PATIENTS} patients)       wall time                         "
          f"CPU ms per query")
    print(f"  {'path':<9} {'query':<9} {'median':>9} {'p95':>9}  ratio: median  p95   "
          + " ".join(CPU_HEADINGS))
    ratios = {}
    for (way, kind), series in small.items():
        (middle, p95), (base_middle, base_p95) = median_p95(series.seconds), median_p95(small["direct", kind].seconds)
        ratios[way, kind] = middle / base_middle
        print(f"  {way:<9} {kind:<9} {middle * 1000:6.2f} ms {p95 * 1000:6.2f} ms  {middle / base_middle:10.2f}x "
              f"{p95 / base_p95:5.2f}x  {cpu_columns(series, way, 1000, 2)}")
    for label, timings in zip(("rdflib parse alone, in this process", "the same through the ParserPool"), parsed):
        middle, p95 = median_p95(timings)
        print(f"  {label:<36} {middle * 1000:6.2f} ms {p95 * 1000:6.2f} ms")
    middle = {key: statistics.median(series.seconds) * 1000 for key, series in small.items()}
    print(f"  added at the median: gateway in the runner "
          f"{middle['no relay', 'repeated'] - middle['direct', 'repeated']:.2f} ms, relay hop "
          f"{middle['gateway', 'repeated'] - middle['no relay', 'repeated']:.2f} ms, parse of a new text "
          f"{middle['gateway', 'new text'] - middle['gateway', 'repeated']:.2f} ms")
    for kind in ("repeated", "new text"):
        verdict = "met" if ratios["gateway", kind] < 1.3 else "MISSED"
        print(f"  aim: gateway < 1.3x direct for the small query, {kind}: {verdict} ({ratios['gateway', kind]:.2f}x)")

    print(f" large SELECT (every triple of a bulk cohort, SPARQL JSON), {args.repeats} queries per size and path")
    print(f"  {'answer':>9}  {'path':<9} {'median':>9} {'MB/s':>6} {'ratio':>6}  runner peak RSS growth      "
          f"CPU s per query: " + " ".join(CPU_HEADINGS))
    for size in args.large_mb:
        answer_bytes = large[size, "direct"].bytes[0]
        direct_median = statistics.median(large[size, "direct"].seconds)
        for way in WAYS:
            series = large[size, way]
            middle = statistics.median(series.seconds)
            rss = f"+{memory[size, way][0]:.1f} MB (from {memory[size, way][1]:.0f} MB)" if way != "direct" else ""
            same = "" if set(series.bytes) == {answer_bytes} else " (answers differ in size!)"
            print(f"  {answer_bytes / MB:6.1f} MB  {way:<9} {middle * 1000:6.0f} ms {answer_bytes / MB / middle:6.1f} "
                  f"{middle / direct_median:5.2f}x  {rss:<27} {' ' * 16} {cpu_columns(series, way, 1, 3)}{same}")
    worst = max(growth for growth, _before in memory.values())
    print(f"  aim: runner peak RSS growth < 20 MB while streaming: {'met' if worst < 20 else 'MISSED'} "
          f"(largest +{worst:.1f} MB); besides, the ParserPool's {len(workers_mb)} worker process(es): "
          f"{', '.join(f'{size:.0f}' for size in workers_mb)} MB resident")
    answered = sum(1 for entry in recorded if entry.get("status") == "answered")
    print(f"  the gateway recorded {len(recorded)} queries, {answered} answered, of {sent} sent through it")


if __name__ == "__main__":
    main()
