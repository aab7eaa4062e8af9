"""Streaming benchmark: a large result uploaded by the site runner's client and downloaded again.

    .venv/bin/python bench/streaming.py [--size-mb 1024] [--database-url URL]

Prints throughput of each direction and the growth of peak resident memory (VmHWM) of the
registry process and of this process (which uploads with client/registry_client.py, exactly as
a runner does, and downloads in chunks, as a researcher does). Target: growth < 50 MB each.
Linux only (reads /proc).
"""

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.registry_client import RegistryClient  # noqa: E402
from scripts.federation import free_port, wait_until_answers  # noqa: E402

MB = 1024 * 1024


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def own_peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_random_file(path, size_mb):
    block = os.urandom(MB)
    with open(path, "wb") as file:
        for _ in range(size_mb):
            file.write(block)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pht-bench-") as folder:
        folder = Path(folder)
        taskmaster = [sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(folder / "registry"),
                      "--database-url", args.database_url]
        admin = lambda *command: subprocess.run([*taskmaster, *command], check=True, capture_output=True,
                                                text=True).stdout.strip()
        site_token, researcher_token = admin("create-site", "bench-site"), admin("create-researcher", "bench")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        registry = subprocess.Popen([*taskmaster, "serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--max-result-bytes", str((args.size_mb + 1) * MB)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_answers(url + "/health", registry, "the registry")
            researcher = {"Authorization": f"Bearer {researcher_token}"}
            requests.post(url + "/api/tasks", json={"image": "bench/stream:1", "input": "{}"},
                          headers=researcher, timeout=10).raise_for_status()
            runner = RegistryClient(url, site_token)
            run = runner.claim_run(0, sparql_ok=None)

            result = folder / "result.bin"
            write_random_file(result, args.size_mb)
            registry_before, own_before = peak_rss_mb(registry.pid), own_peak_rss_mb()

            started = time.perf_counter()
            runner.upload(run.id, run.lease_id, "output", result)
            upload_seconds = time.perf_counter() - started
            registry_after_upload, own_after_upload = peak_rss_mb(registry.pid), own_peak_rss_mb()

            started = time.perf_counter()
            digest = hashlib.sha256()
            with requests.get(f"{url}/api/runs/{run.id}/output", headers=researcher, stream=True,
                              timeout=300) as download, open(folder / "downloaded.bin", "wb") as target:
                download.raise_for_status()
                for chunk in download.iter_content(MB):
                    digest.update(chunk)
                    target.write(chunk)
            download_seconds = time.perf_counter() - started
            registry_after, own_after = peak_rss_mb(registry.pid), own_peak_rss_mb()
            expected = download.headers["X-Content-SHA256"]
        finally:
            registry.terminate()
            registry.wait(timeout=10)

    print(f"streaming {args.size_mb} MB ({'PostgreSQL' if args.database_url else 'SQLite'})")
    print(f"  upload   {args.size_mb / upload_seconds:8.1f} MB/s   registry peak RSS +{registry_after_upload - registry_before:6.1f} MB"
          f"   uploader peak RSS +{own_after_upload - own_before:6.1f} MB")
    print(f"  download {args.size_mb / download_seconds:8.1f} MB/s   registry peak RSS +{registry_after - registry_after_upload:6.1f} MB"
          f"   downloader peak RSS +{own_after - own_after_upload:6.1f} MB")
    print(f"  checksum {'intact' if digest.hexdigest() == expected else 'MISMATCH'}")
    print(f"  registry peak RSS {registry_after:.1f} MB in all (target: growth < 50 MB)")
    return 0 if digest.hexdigest() == expected else 1


if __name__ == "__main__":
    sys.exit(main())
