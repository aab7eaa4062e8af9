"""Streaming benchmark: a large result uploaded by the site runner's client and downloaded again.

    .venv/bin/python -m bench.streaming [--size-mb 1024] [--database-url URL]
        [--result-store s3://BUCKET --s3-endpoint-url URL]   (with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY set)

Prints throughput of each direction and the growth of peak resident memory (VmHWM) of the
registry process and of this process (which uploads with client/registry_client.py, exactly as
a runner does, and downloads in chunks, as a researcher does). Then the researcher library's
part: an output folder of FILES incompressible files, SIZE in all, packed and uploaded as a site
runner does (half CSV-like text, half incompressible), then downloaded by Registry.result()
(streamed to a file, its sha256 checked) and unpacked by extract_to(), with the growth of this
process's peak RSS in each (VmHWM, reset before each) and the registry's. The registry's
--max-result-bytes and the library's ResultLimits are raised to SIZE, as a consortium that allows
such results configures them (a site raises max_output_bytes in its config). Target: growth < 50 MB
each. Linux only (reads /proc).
"""

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
from bench.measures import MB, own_peak_rss_growth_mb, own_peak_rss_mb, peak_rss_mb  # noqa: E402
from bench.sample_outputs import write_csv_file, write_random_file  # noqa: E402
from client.output_archive import pack_output  # noqa: E402
from client.registry_client import RegistryClient, sha256_of  # noqa: E402
from researcher import Registry, ResultLimits  # noqa: E402
from scripts.federation import free_port, wait_until_answers  # noqa: E402

FILES = 16  # in the researcher's result
# What the registry takes beyond the result itself: an archive's headers, and gzip's few bytes per block.
ARCHIVE_ROOM_MB = 16
TARGET_GROWTH_MB = 50  # of any process's peak RSS, in any phase


def researcher_result(url, researcher, researcher_token, runner, folder, size_mb, registry_pid):
    """A site's result of FILES files, size_mb in all, packed and uploaded as a runner does; then downloaded and
    extracted by the researcher library. Returns ({phase: (seconds, this process's peak RSS growth in MB)}, the
    registry's peak RSS growth while it sent the result, whether every extracted file is the one sent)."""
    output = folder / "output"
    output.mkdir()
    for number in range(FILES):
        write = write_csv_file if number % 2 else write_random_file
        write(output / f"part-{number:02}", size_mb * MB // FILES)
    archive = folder / "output.tar.gz"
    task = requests.post(url + "/api/tasks", json={"image": "bench/stream:1", "input": "{}"},
                         headers=researcher, timeout=10)
    task.raise_for_status()
    run = runner.claim_run(0, sparql_ok=None)
    runner.report_started(run.id, run.lease_id, "sha256:" + "0" * 64)
    phases = {"pack_output()": own_peak_rss_growth_mb(lambda: pack_output(output, archive, size_mb * MB))}
    registry_before = peak_rss_mb(registry_pid)
    phases["upload"] = own_peak_rss_growth_mb(lambda: runner.upload(run.id, run.lease_id, "output", archive))
    registry_growths = [peak_rss_mb(registry_pid) - registry_before]
    runner.finish(run.id, run.lease_id, 0)
    archive_mb = archive.stat().st_size / MB
    archive.unlink()

    room = (size_mb + ARCHIVE_ROOM_MB) * MB
    library = Registry(url, researcher_token, download_dir=folder / "downloads",
                       limits=ResultLimits(max_archive_bytes=room, max_unpacked_bytes=room))
    [listed] = library.task(task.json()["id"])["runs"]
    registry_before = peak_rss_mb(registry_pid)
    phases["Registry.result()"] = own_peak_rss_growth_mb(lambda: library.result(listed))
    registry_growths.append(peak_rss_mb(registry_pid) - registry_before)
    result = phases["Registry.result()"][0]
    phases["extract_to()"] = own_peak_rss_growth_mb(lambda: result.extract_to(folder / "extracted"))
    extracted = phases["extract_to()"][0]
    intact = all(sha256_of(extracted / path.name) == sha256_of(path) for path in output.iterdir())
    result.close()
    return ({phase: (seconds, growth) for phase, (_value, seconds, growth) in phases.items()}, archive_mb,
            registry_growths, intact)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--database-url", default="", help="default: SQLite in a temporary folder")
    parser.add_argument("--result-store", default="", help="default: the registry's data folder")
    parser.add_argument("--s3-endpoint-url", default="")
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
                                     "--max-result-bytes", str((args.size_mb + ARCHIVE_ROOM_MB) * MB),
                                     "--result-store", args.result_store, "--s3-endpoint-url", args.s3_endpoint_url],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_answers(url + "/health", registry, "the registry")
            researcher = {"Authorization": f"Bearer {researcher_token}"}
            requests.post(url + "/api/tasks", json={"image": "bench/stream:1", "input": "{}"},
                          headers=researcher, timeout=10).raise_for_status()
            result = folder / "result.bin"
            write_random_file(result, args.size_mb * MB)
            # Claimed once the file is written: the lease (60 s) covers only the upload, download and finish.
            runner = RegistryClient(url, site_token)
            run = runner.claim_run(0, sparql_ok=None)
            runner.report_started(run.id, run.lease_id, "sha256:" + "0" * 64)
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
            runner.finish(run.id, run.lease_id, 0)  # or the researcher's part would claim this run again
            result.unlink()
            (folder / "downloaded.bin").unlink()

            library_phases, archive_mb, registry_growths, intact = researcher_result(
                url, researcher, researcher_token, runner, folder, args.size_mb, registry.pid)
        finally:
            registry.terminate()
            registry.wait(timeout=10)

    print(f"streaming {args.size_mb} MB ({'PostgreSQL' if args.database_url else 'SQLite'}, results in "
          f"{args.result_store or 'the data folder'})")
    print(f"  upload   {args.size_mb / upload_seconds:8.1f} MB/s   registry peak RSS +{registry_after_upload - registry_before:6.1f} MB"
          f"   uploader peak RSS +{own_after_upload - own_before:6.1f} MB")
    print(f"  download {args.size_mb / download_seconds:8.1f} MB/s   registry peak RSS +{registry_after - registry_after_upload:6.1f} MB"
          f"   downloader peak RSS +{own_after - own_after_upload:6.1f} MB")
    print(f"  checksum {'intact' if digest.hexdigest() == expected else 'MISMATCH'}")
    print(f"  registry peak RSS {registry_after:.1f} MB in all (target: growth < 50 MB)")
    print(f"a site's result of {FILES} files, {args.size_mb} MB in all (half CSV-like, half incompressible), "
          f"packed to {archive_mb:.0f} MB, through the researcher library")
    for phase, (seconds, growth) in library_phases.items():
        party = "site" if phase in ("pack_output()", "upload") else "researcher"
        print(f"  {phase:<18} {seconds:7.1f} s {args.size_mb / seconds:8.1f} MB/s   {party} peak RSS {growth:+6.1f} MB")
    print(f"  registry peak RSS +{registry_growths[0]:6.1f} MB while it took the result, "
          f"+{registry_growths[1]:6.1f} MB while it sent it")
    print(f"  extracted files {'intact' if intact else 'NOT AS SENT'} (target: growth < 50 MB)")
    growths = [registry_after_upload - registry_before, own_after_upload - own_before,
               registry_after - registry_after_upload, own_after - own_after_upload, *registry_growths,
               *(growth for _seconds, growth in library_phases.values())]
    over = [growth for growth in growths if growth >= TARGET_GROWTH_MB]
    if over:
        print(f"OVER TARGET: peak RSS grew by {max(over):.1f} MB (target: < {TARGET_GROWTH_MB} MB)")
    return 0 if digest.hexdigest() == expected and intact and not over else 1


if __name__ == "__main__":
    sys.exit(main())
