"""Wide-task benchmark: one task to many simulated sites, from the researcher's post to every result downloaded.

    .venv/bin/python -m bench.wide_task [--sites 200] [--rounds 5] [--database-url URL]

The sites are bench/scale.py's simulated ones (greenlets that do over HTTP what a runner does, without
containers), parked on their long-polls before each round. Each round the researcher library posts one task to
every site and calls wait_for_results(): it long-polls the task, then downloads and checks every site's output
and log. Rounds alternate between the sites reporting as runners do now (the claim carries the input, the finish
report the small output and log: claim, start, finish) and as runners did before API 1.4 (the
input, output and log each by a request of their own), so the ratio comes from one run. Prints
the median and the best round of each, and the registry's CPU per round. Target (issue 18): 200 sites in
1.5 s at most.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

from bench.scale import SimulatedSite, cpu_seconds, start_registries  # noqa: E402
from master import store  # noqa: E402
from researcher import Registry  # noqa: E402
from scripts.federation import register_directly  # noqa: E402

IMAGE = "127.0.0.1:5050/pht/wide@sha256:" + "0" * 64


class Site(SimulatedSite):
    """A simulated site that reports as runners do now, or, while as_before[0], as runners did before API 1.4: it
    downloads the input, and uploads the output and log by requests of their own."""

    def __init__(self, url, token, as_before):
        super().__init__(url, token, claimed_at={}, stop=[False])
        self.as_before = as_before

    def report(self, run):
        if self.as_before[0]:
            self.http.get(f"{self.url}/api/site/runs/{run['id']}/input", timeout=60).raise_for_status()
            run = {key: value for key, value in run.items() if key != "inline_result_bytes"}
        super().report(run)


def one_round(researcher, site_names):
    """(seconds from the post to every site's result downloaded, seconds of those spent downloading): what
    wait_for_results() does, in its two parts."""
    started = time.monotonic()
    task = researcher.submit(IMAGE, {"round": True}, sites=site_names)
    ended = researcher.wait(task["id"], timeout_seconds=120, progress=False)
    downloading = time.monotonic()
    results = researcher.results(ended)
    finished = time.monotonic()
    assert len(results) == len(site_names) and all(result.archive_path is not None for result in results)
    for result in results:
        result.close()
    return finished - started, finished - downloading


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="of each kind of site")
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pht-bench-") as folder:
        folder = Path(folder)
        database_url = args.database_url or f"sqlite:///{folder / 'registry.sqlite'}"
        [(registry_process, url)] = start_registries(1, database_url, folder)
        try:
            site_tokens = register_directly(database_url, store.SITE, [f"site-{i:04d}" for i in range(args.sites)])
            researcher_token = register_directly(database_url, store.RESEARCHER, ["bench"])["bench"]
            researcher = Registry(url, researcher_token, download_dir=folder / "downloads")
            as_before = [False]
            sites = [Site(url, token, as_before) for token in site_tokens.values()]
            workers = [gevent.spawn(site.work) for site in sites]
            timings = {False: [], True: []}
            for before in [False, True] * args.rounds:
                as_before[0] = before
                gevent.sleep(2 + args.sites / 500)  # every site has claimed again, and is parked
                cpu_before = cpu_seconds(registry_process.pid)
                seconds, downloading = one_round(researcher, list(site_tokens))
                timings[before].append((seconds, downloading, cpu_seconds(registry_process.pid) - cpu_before))
            for site in sites:
                site.stop[0] = True
            gevent.killall(workers, timeout=10)
            errors = sum(sum(site.errors.values()) for site in sites)
        finally:
            registry_process.terminate()
            registry_process.wait(timeout=10)
    print(f"one task to {args.sites} sites, post -> every result downloaded, {args.rounds} rounds of each "
          f"({'PostgreSQL' if args.database_url else 'SQLite'})")
    for before, label in [(False, "runners now (API 1.4)"), (True, "runners before API 1.4")]:
        seconds, downloading, cpu = (statistics.median(column) for column in zip(*timings[before]))
        print(f"  {label:<24} median {seconds:5.2f} s (downloads {downloading:5.2f} s), best "
              f"{min(s for s, _, _ in timings[before]):5.2f} s; registry CPU {cpu:5.2f} s a round")
    ratio = statistics.median(s for s, _, _ in timings[True]) / statistics.median(s for s, _, _ in timings[False])
    print(f"  ratio (before / now): {ratio:.2f}; errors at the sites: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
