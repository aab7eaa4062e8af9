"""Round overhead: what the PHT adds to one round of an iterative analysis.

    .venv/bin/python -m bench.round_overhead [--rounds 10] [--sites 3]

A local federation (registry, N sites with their runners and SPARQL endpoints) runs ROUNDS tasks of a trivial
algorithm (patient-count) in one session, one after the other, as an iterative analysis does; each of its runs
goes through the site's SPARQL gateway (a relay container, kept from the session's round before after the
first, then the query checked and forwarded). In the same run, the same image is started with a bare `docker
run` (docker SDK) ROUNDS times, alone and N at once (as the N sites of a round run it on this one machine),
querying the same endpoint directly: host networking, the only way a bare container reaches loopback, and what
the PHT did before the gateway. The image is pinned to its digest once, before the first round, as an iterative
analysis does (README: every round runs the same image); a round is then a post, the sites' runs and the downloads.
A first round, not counted, starts the session's relays. Bare runs and rounds take turns, half a second apart.
Printed: the median wall time of a round, of the bare runs, and the ratios.
Target (issue 18): the ratio to N bare runs at once <= 1.25. Needs scripts/setup.sh to have run.
"""

import argparse
import concurrent.futures
import statistics
import time

import docker

from researcher import pin_to_digest
from scripts.federation import IMAGE_REGISTRY, LocalFederation  # noqa: E402

IMAGE = f"{IMAGE_REGISTRY}/pht/patient-count:latest"
SETTLE_SECONDS = 0.5


def bare_docker_run(engine, sparql_endpoint):
    started = time.perf_counter()
    engine.containers.run(IMAGE, ["python3", "-c", "import sys; sys.path.insert(0, '/app'); "
                                  "import count_patients; print(count_patients.count_patients(%r))" % sparql_endpoint],
                          network_mode="host", remove=True)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", type=int, default=3)
    args = parser.parse_args()

    engine = docker.from_env()
    engine.images.pull(IMAGE)
    names = tuple(f"hospital-{chr(ord('a') + i)}" for i in range(args.sites))
    with LocalFederation(site_names=names, patients_per_site=100) as federation:
        researcher = federation.researcher()
        endpoint = next(iter(federation.sites.values())).sparql_endpoint
        image = pin_to_digest(IMAGE)
        bare_docker_run(engine, endpoint)  # warm the page cache
        task = researcher.submit(image, {"label": "warm-up"})  # each site's first run starts its session's relay
        researcher.wait_for_results(task["id"], timeout_seconds=120, progress=False)
        session_id = task["session_id"]
        rounds, bare, side_by_side = [], [], []
        with concurrent.futures.ThreadPoolExecutor(args.sites) as pool:
            # Interleaved, so that a machine busier for a while slows both alike; each after a pause in which
            # what the one before left behind (the runners' clean-up, containers' removal) is done.
            for number in range(args.rounds):
                time.sleep(SETTLE_SECONDS)
                bare.append(bare_docker_run(engine, endpoint))
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                list(pool.map(lambda _: bare_docker_run(engine, endpoint), range(args.sites)))
                side_by_side.append(time.perf_counter() - started)
                time.sleep(SETTLE_SECONDS)
                started = time.perf_counter()
                task = researcher.submit(image, {"label": f"round {number}"}, session_id=session_id)
                researcher.wait_for_results(task["id"], timeout_seconds=120, progress=False)
                rounds.append(time.perf_counter() - started)

    round_median, bare_median = statistics.median(rounds), statistics.median(bare)
    side_by_side_median = statistics.median(side_by_side)
    print(f"round overhead, {args.sites} sites, {args.rounds} rounds, image {IMAGE}")
    print("  rounds:", " ".join(f"{seconds * 1000:.0f}" for seconds in rounds), "ms")
    print(f"  round (post -> all {args.sites} results downloaded): median {round_median * 1000:7.0f} ms, "
          f"max {max(rounds) * 1000:7.0f} ms")
    print(f"  bare docker run (one container):                median {bare_median * 1000:7.0f} ms, "
          f"max {max(bare) * 1000:7.0f} ms")
    print(f"  {args.sites} bare docker runs at once:                 median {side_by_side_median * 1000:7.0f} ms")
    print(f"  ratio round / bare docker run:                {round_median / bare_median:.2f}")
    print(f"  ratio round / {args.sites} bare docker runs at once:     {round_median / side_by_side_median:.2f} "
          "(target <= 1.25)")


if __name__ == "__main__":
    main()
