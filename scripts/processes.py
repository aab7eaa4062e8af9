"""The processes the scripts, tests and benchmarks start on this machine."""

import subprocess


def stop_process(process, timeout=10):
    """SIGTERM, and SIGKILL if it has not exited within timeout seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
