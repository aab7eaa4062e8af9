"""Memory and time of a benchmark's phases. Linux only: peak RSS is read from /proc (VmHWM)."""

import os
import resource
import time
from pathlib import Path

MB = 1024 * 1024


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def own_peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def own_peak_rss_growth_mb(work):
    """(what work() returns, seconds it took, growth of this process's peak RSS meanwhile in MB): VmHWM is reset
    to the current RSS first, so what came before does not hide it."""
    Path("/proc/self/clear_refs").write_text("5")
    before = peak_rss_mb(os.getpid())
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started, peak_rss_mb(os.getpid()) - before
