"""Soak run: many tasks through a whole local federation, with cancels and a runner killed mid-way.

    .venv/bin/python -m bench.soak [--tasks 200] [--sites 3] [--cancel-share 0.1] [--seed 7]
        [--replicas 2 --database-url postgresql+psycopg://… --result-store s3://BUCKET --s3-endpoint-url URL]

Posts TASKS tasks for every site (patient-count), cancels a random share of them at random moments,
and kills one site's runner with SIGKILL halfway and starts it again. With --replicas, the registry is
that many replicas behind HAProxy (on PostgreSQL and an S3 bucket, AWS_* in the environment), and one
replica is killed with SIGKILL halfway too, and started again. Then checks, and prints:
- every run ended (completed, failed, refused or cancelled) within the time limit;
- no result lost: every completed run's output and log download whole, matching their sha256;
- nothing duplicated: one run per task and site, at most one completed event per run, and every
  completed run's result says that site's patient count;
- on SQLite, the registry's database passes PRAGMA integrity_check and foreign_key_check.
Exits non-zero if any check fails. Needs scripts/setup.sh to have run. Loopback only; every wait
is bounded.
"""

import argparse
import collections
import random
import signal
import sqlite3
import sys
import time

import sqlalchemy as sa

from master import lifecycle, store  # noqa: E402
from researcher import ChecksumMismatch, RegistryError  # noqa: E402
from scripts.federation import IMAGE_REGISTRY, LocalFederation  # noqa: E402

IMAGE = f"{IMAGE_REGISTRY}/pht/patient-count:latest"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--cancel-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for every run to end")
    parser.add_argument("--replicas", type=int, default=1, help="registry replicas behind HAProxy")
    parser.add_argument("--database-url", default="",
                        help="PostgreSQL for --replicas, emptied first: give it a database of its own (default: SQLite)")
    parser.add_argument("--result-store", default="", help="s3://BUCKET, for --replicas")
    parser.add_argument("--s3-endpoint-url", default="")
    args = parser.parse_args()
    if args.database_url:  # a database of its own, emptied, as scale.py does
        engine = sa.create_engine(args.database_url)
        store.metadata.drop_all(engine)
        engine.dispose()
    chance = random.Random(args.seed)
    names = tuple(f"site-{i}" for i in range(args.sites))
    started = time.monotonic()
    failures = []

    with LocalFederation(site_names=names, patients_per_site=30, lease_seconds=20,
                         site_settings={"max_concurrent_runs": 2}, replicas=args.replicas,
                         database_url=args.database_url, result_store=args.result_store,
                         s3_endpoint_url=args.s3_endpoint_url) as federation:
        researcher = federation.researcher()
        task_ids, cancelled = [], set()
        for number in range(args.tasks):
            task_ids.append(researcher.submit(IMAGE, {"label": f"soak {number}"})["id"])
            if chance.random() < args.cancel_share:
                victim = chance.choice(task_ids)
                researcher.cancel(victim)
                cancelled.add(victim)
            if number == args.tasks // 2:
                victim_site = chance.choice(names)
                federation.stop_runner(victim_site, how=signal.SIGKILL)
                print(f"killed the runner of {victim_site} after {number + 1} tasks; starting it again", flush=True)
                federation.start_runner(victim_site)
                if args.replicas > 1:
                    federation.stop_registry(0, how=signal.SIGKILL)
                    print("killed registry replica 0; starting it again", flush=True)
                    federation.start_registry(0)
            time.sleep(0.05)

        deadline = time.monotonic() + args.time_limit
        while time.monotonic() < deadline:
            active = list(researcher.tasks(status=lifecycle.TaskStatus.ACTIVE))
            if not active:
                break
            time.sleep(2)
        tasks = [researcher.task(task_id) for task_id in task_ids]
        elapsed = time.monotonic() - started

        statuses = collections.Counter(run["status"] for task in tasks for run in task["runs"])
        print(f"{args.tasks} tasks x {args.sites} sites in {elapsed:.0f} s: "
              + ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())))
        print(f"tasks cancelled on purpose: {len(cancelled)}")

        for task in tasks:
            sites_seen = [run["site"] for run in task["runs"]]
            if sorted(sites_seen) != sorted(names):
                failures.append(f"task {task['id']}: runs for {sites_seen}, expected one per site")
            for run in task["runs"]:
                where = f"task {task['id']} run {run['id']} ({run['site']})"
                if run["status"] not in lifecycle.TERMINAL_STATES:
                    failures.append(f"{where}: still {run['status']} after the time limit")
                if run["status"] == lifecycle.CANCELLED and task["id"] not in cancelled:
                    failures.append(f"{where}: cancelled, but nobody cancelled its task")
                if run["status"] in (lifecycle.FAILED, lifecycle.REFUSED):
                    failures.append(f"{where}: {run['status']}: {run['reason']}")
                if run["status"] != lifecycle.COMPLETED:
                    continue
                completions = [e for e in researcher.run_history(run["id"]) if e["status"] == lifecycle.COMPLETED]
                if len(completions) != 1:
                    failures.append(f"{where}: completed {len(completions)} times")
                if not (run["output_sha256"] and run["log_sha256"]):
                    failures.append(f"{where}: completed without its output or log")
                    continue
                try:
                    result = researcher.result(run)  # each checked against its sha256 as it downloads
                except (RegistryError, ChecksumMismatch) as error:
                    failures.append(f"{where}: its result does not download whole: {error}")
                    continue
                expected = len(federation.sites[run["site"]].patients)
                if result.output["patient_count"] != expected:
                    failures.append(f"{where}: its result is not its site's patient count")

        if not args.database_url:
            database = sqlite3.connect(federation.folder / "registry" / "registry.sqlite")
            integrity = database.execute("PRAGMA integrity_check").fetchall()
            foreign = database.execute("PRAGMA foreign_key_check").fetchall()
            database.close()
            print(f"database: integrity_check {integrity[0][0]}, foreign_key_check {len(foreign)} problem(s)")
            if integrity != [("ok",)] or foreign:
                failures.append(f"database: integrity {integrity}, foreign keys {foreign}")

    for failure in failures[:30]:
        print("FAIL", failure)
    print("soak: " + ("every check passed" if not failures else f"{len(failures)} check(s) failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
