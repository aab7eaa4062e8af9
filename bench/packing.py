"""Packing benchmark: how fast the site runner packs an output folder, and how much it shrinks.

    .venv/bin/python -m bench.packing [--size-mb 256]

Packs two output folders of SIZE each, one of CSV-like text (what most analyses write) and one of random bytes (an
already compressed or encrypted file), with the runner's pack_output (client/output_archive.py), and, for the
ratio in one run, as the runner packed before: tarfile's "w:gz", zlib at level 9. Prints MB/s of output read,
the archive's size as a fraction of the output's, and the growth of this process's peak RSS (VmHWM, reset before
each). Each archive is read back whole with Python's gzip and tarfile, as the researcher library reads it.
Linux only (reads /proc).
"""

import argparse
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.measures import MB, own_peak_rss_growth_mb
from bench.sample_outputs import write_csv_file, write_random_file
from client.output_archive import pack_output

FILES = 4  # in each output folder


def pack_as_before(folder, archive_path):
    """The runner's packing until 2026-12-04: tarfile's gzip, zlib's default level 9."""
    with tarfile.open(archive_path, "w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=path.name)


def read_back(archive_path):
    """Bytes of file data in the archive, read as the researcher library reads it: gzip, then tar as a stream."""
    total = 0
    with tarfile.open(archive_path, mode="r|gz") as archive:
        for member in archive:
            if member.isfile():
                data = archive.extractfile(member)
                while chunk := data.read(MB):
                    total += len(chunk)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="of each output folder")
    args = parser.parse_args()
    size = args.size_mb * MB
    print(f"packing an output folder of {FILES} files, {args.size_mb} MB in all")
    print(f"  {'content':<8} {'packer':<24} {'MB/s':>8} {'size':>7} {'peak RSS':>9}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="pht-bench-") as folder:
        folder = Path(folder)
        for content, write in [("CSV", lambda path, n, i: write_csv_file(path, n, seed=i)),
                               ("random", lambda path, n, _i: write_random_file(path, n))]:
            output = folder / content
            output.mkdir()
            for number in range(FILES):
                write(output / f"part-{number}", size // FILES, number)
            for packer, pack in [("zlib level 9 (before)", lambda target: pack_as_before(output, target)),
                                 ("pack_output (ISA-L 1)", lambda target: pack_output(output, target, size))]:
                archive = folder / "output.tar.gz"
                _, seconds, growth = own_peak_rss_growth_mb(lambda: pack(archive))
                print(f"  {content:<8} {packer:<24} {args.size_mb / seconds:8.1f} "
                      f"{archive.stat().st_size / size:7.3f} {growth:+8.1f} MB")
                if read_back(archive) != size:
                    print(f"  READ BACK WRONG: {content}, {packer}")
                    failed = True
                archive.unlink()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
