"""Dispatch latency: from the researcher's POST to the algorithm's first instruction at the site.

    .venv/bin/python -m bench.dispatch_latency [--tasks 50] [--interval 5]

One site, one task at a time: the image writes time.time() as its first instruction (same machine,
same clock). Measured twice in one run: the runner long-polling (the default), and the runner asking
every --interval seconds (the original PyTaskManager's way, long_poll_seconds 0). Prints median and
p95 of each and their ratio. Target: long-poll p95 < 100 ms. Also printed, to separate what the PHT
adds from what the Docker engine costs: POST -> the site holds the run (the run's "claimed" time in
the registry), and the engine's own time from container start to the first instruction. Needs
scripts/setup.sh to have run.
"""

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
from master import lifecycle  # noqa: E402
from scripts.federation import IMAGE_REGISTRY, LocalFederation  # noqa: E402

IMAGE = f"{IMAGE_REGISTRY}/pht/bench-first-instruction:latest"
BASE_IMAGE = "pht-base:bookworm"


def build_and_push():
    engine = docker.from_env()
    engine.images.build(path=str(ROOT / "bench" / "images" / "first-instruction"), tag=IMAGE, rm=True,
                        buildargs={"BASE": BASE_IMAGE}, network_mode="none")
    for line in engine.images.push(IMAGE, stream=True, decode=True):
        if "error" in line:
            raise SystemExit(f"pushing {IMAGE} failed: {line['error']}")


def latencies(tasks, site_settings):
    """(POST -> first instruction, POST -> claimed by the site) for each task."""
    to_first_instruction, to_claim = [], []
    with LocalFederation(site_names=("hospital-a",), patients_per_site=5, site_settings=site_settings) as federation:
        researcher = federation.researcher()
        for _ in range(tasks):
            posted = time.time()
            task = researcher.submit(IMAGE, "{}")
            [result] = researcher.wait_for_results(task["id"], timeout_seconds=120, progress=False)
            to_first_instruction.append(float(result.files["started_at"]) - posted)
            claimed = next(e["at"] for e in researcher.run_history(result.run_id) if e["status"] == lifecycle.CLAIMED)
            to_claim.append(datetime.fromisoformat(claimed).timestamp() - posted)
    return to_first_instruction, to_claim


def engine_start_to_first_instruction(runs=10):
    """The Docker engine alone: container start -> first instruction, same image, no PHT involved."""
    engine, measured = docker.from_env(), []
    with tempfile.TemporaryDirectory() as output:
        os.chmod(output, 0o777)
        for _ in range(runs):
            container = engine.containers.create(IMAGE, volumes={output: {"bind": "/output", "mode": "rw"}},
                                                 network_mode="none", user="65534:65534")
            started = time.time()
            container.start()
            container.wait()
            measured.append(float(Path(output, "started_at").read_text()) - started)
            container.remove()
    return measured


def describe(name, values):
    ordered = sorted(values)
    p95 = ordered[round(0.95 * (len(ordered) - 1))]
    print(f"  {name:<34} median {statistics.median(ordered) * 1000:8.0f} ms   p95 {p95 * 1000:8.0f} ms")
    return p95


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--interval", type=int, default=5)
    args = parser.parse_args()
    build_and_push()
    long_poll, long_poll_claim = latencies(args.tasks, {"long_poll_seconds": 30})
    interval, interval_claim = latencies(args.tasks, {"long_poll_seconds": 0, "poll_interval_seconds": args.interval})
    engine_only = engine_start_to_first_instruction()
    print(f"dispatch latency, {args.tasks} tasks each")
    print(" POST -> first instruction in the container:")
    long_p95 = describe("long-poll (default)", long_poll)
    interval_p95 = describe(f"plain poll every {args.interval} s", interval)
    print(" POST -> the site holds the run:")
    describe("long-poll (default)", long_poll_claim)
    describe(f"plain poll every {args.interval} s", interval_claim)
    print(" the Docker engine alone, container start -> first instruction:")
    describe("docker start, no PHT", engine_only)
    print(f"  ratio of medians (interval / long-poll): {statistics.median(interval) / statistics.median(long_poll):.1f}"
          f"   of p95s: {interval_p95 / long_p95:.1f}   (target: long-poll p95 < 100 ms)")


if __name__ == "__main__":
    main()
