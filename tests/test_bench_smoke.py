"""Each benchmark runs, with tiny sizes: the figures in docs/performance.md come from the full runs."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_result_store import bucket, s3, s3_credentials, s3_endpoint  # noqa: F401 (fixtures)


def run_bench(script, *arguments):
    done = subprocess.run([sys.executable, "-m", f"bench.{script.removesuffix('.py')}", *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_streaming_benchmark_keeps_the_checksum():
    assert "checksum intact" in run_bench("streaming.py", "--size-mb", "4")


def test_packing_benchmark_reads_back_what_it_packed():
    output = run_bench("packing.py", "--size-mb", "4")
    rows = [line for line in output.splitlines() if "MB" in line and ("CSV" in line or "random" in line)]
    assert len(rows) == 4 and "READ BACK WRONG" not in output, output


def test_wide_task_benchmark_downloads_every_result_both_ways():
    output = run_bench("wide_task.py", "--sites", "5", "--rounds", "1")
    assert "runners now (API 1.4)" in output and "runners before API 1.4" in output
    assert output.rstrip().endswith("errors at the sites: 0"), output


# One second of posting at 10 tasks a second: about 10 tasks, enough to see every one dispatched.
SCALE_SECONDS = "1"


def test_scale_benchmark_dispatches_every_task():
    table = run_bench("scale.py", "--sites", "20", "--seconds", SCALE_SECONDS, "--rate", "10").splitlines()
    sites, posted, dispatched, *_ = table[2].split()
    assert sites == "20" and int(posted) > 0 and posted == dispatched


@pytest.mark.parametrize("balancer", [[], ["--balancer"]], ids=["replicas", "replicas-behind-haproxy"])
def test_scale_benchmark_dispatches_every_task_across_replicas(balancer):
    database_url = os.environ.get("PHT_TEST_DATABASE_URL")
    if not database_url:
        pytest.skip("PHT_TEST_DATABASE_URL is not set: no PostgreSQL server (scripts/test.sh starts one)")
    table = run_bench("scale.py", "--sites", "20", "--seconds", SCALE_SECONDS, "--rate", "10", "--replicas", "2",
                      "--database-url", database_url, *balancer).splitlines()
    sites, posted, dispatched, *_ = table[2].split()
    assert sites == "20" and int(posted) > 0 and posted == dispatched


# Three tasks are enough for the soak's every event and check: with its seed (7) the third is cancelled, and the
# runner (and a replica) is killed after the second is posted, so runs are in flight.
SOAK_TASKS = "3"


def test_soak_benchmark_survives_a_killed_replica_behind_the_balancer(postgres_url, s3_credentials, s3_endpoint,
                                                                     bucket):
    assert "soak: every check passed" in run_bench(
        "soak.py", "--tasks", SOAK_TASKS, "--sites", "2", "--replicas", "2", "--database-url", postgres_url,
        "--result-store", f"s3://{bucket}", "--s3-endpoint-url", s3_endpoint)


@pytest.mark.parametrize("script, arguments, expected", [
    ("soak.py", ["--tasks", SOAK_TASKS, "--sites", "2"], "soak: every check passed"),
    # One site: each round is still a task in one session through a runner and its gateway, beside bare runs.
    ("round_overhead.py", ["--rounds", "2", "--sites", "1"], "ratio round / bare docker run"),
])
def test_federation_benchmarks_run(script, arguments, expected):
    assert expected in run_bench(script, *arguments)


def test_slow_clients_benchmark_answers_every_site_under_attack():
    output = run_bench("slow_clients.py", "--sites", "20", "--slow", "10", "--header-seconds", "1",
                       "--probe-seconds", "1", "--open-files", "0")
    rows = {line.split()[0]: line for line in output.splitlines() if line.startswith(("quiet ", "attack "))}
    assert " 20/20 " in rows["quiet"] and " 20/20 " in rows["attack"], output


def test_sparql_gateway_benchmark_sends_every_query_through_the_gateway():
    output = run_bench("sparql_gateway.py", "--queries", "1", "--large-mb", "1", "--repeats", "1")
    assert "aim: gateway < 1.3x direct for the small query" in output
    last = output.splitlines()[-1]  # the gateway recorded N queries, N answered, of N sent through it
    numbers = {int(word.rstrip(",")) for word in last.split() if word.rstrip(",").isdigit()}
    assert last.lstrip().startswith("the gateway recorded") and len(numbers) == 1 and numbers.pop() > 0, output


@pytest.mark.skipif(os.geteuid() != 0, reason="bench/disk_limits.py mounts filesystems, which needs root")
def test_disk_limits_benchmark_makes_and_removes_filesystems():
    output = run_bench("disk_limits.py", "--runs", "2", "--limits", "4:50")
    assert "4 MiB, 50 files" in output and "MiB" in output.splitlines()[-1]
