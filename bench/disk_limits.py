"""Disk limits benchmark: what a fixed-size filesystem per run costs the site runner, and takes of its disk.

    sudo .venv/bin/python -m bench.disk_limits [--runs 20] [--limits 1024:100000 10240:100000 8:200]

For each limit (MiB:files) it prints how long the runner's start-up sizing takes (disk_limits.calibrate),
the median time to make and mount a run's filesystem and to unmount and remove it again (what every run
adds), and the most the site's disk can hold for one, beyond the limit. Needs root (it mounts).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from client import disk_limits

MIB = 1024 ** 2


def measure(folder, max_bytes, max_files, runs):
    started = time.perf_counter()
    size = disk_limits.calibrate(folder / "check", max_bytes, max_files)
    calibrated = time.perf_counter() - started
    made, removed = [], []
    for number in range(runs):
        run = folder / f"run-{number}"
        run.mkdir()
        started = time.perf_counter()
        disk_limits.mount(run / disk_limits.IMAGE_NAME, run / "disk", size)
        mounted = time.perf_counter()
        disk_limits.remove_folder(run)
        made.append(mounted - started)
        removed.append(time.perf_counter() - mounted)
    return size, calibrated, statistics.median(made), statistics.median(removed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--limits", nargs="+", default=["1024:100000", "10240:100000", "8:200"],
                        help="MiB:files for each filesystem to measure")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/disk_limits.py mounts filesystems: run it as root")
    print(f"{'limit':>24} {'sizing ms':>10} {'make+mount ms':>14} {'unmount+rm ms':>14} {'disk over limit':>16}")
    with tempfile.TemporaryDirectory(prefix="pht-disk-bench-") as folder:
        for limit in args.limits:
            mebibytes, files = (int(part) for part in limit.split(":"))
            size, calibrated, made, removed = measure(Path(folder), mebibytes * MIB, files, args.runs)
            print(f"{f'{mebibytes} MiB, {files} files':>24} {calibrated * 1000:>10.0f} {made * 1000:>14.1f} "
                  f"{removed * 1000:>14.1f} {f'{size.overshoot_bytes / MIB:.1f} MiB':>16}")


if __name__ == "__main__":
    main()
