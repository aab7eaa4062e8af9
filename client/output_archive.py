"""Packing an algorithm's /output folder for upload.

Only regular files and folders go in. Symbolic links are never followed nor
stored, so an algorithm cannot make the runner send a file from outside its
output folder (a link to /etc/passwd, say); what was skipped is listed so the
run log can say so. Packing happens after the container has ended, so nothing
can change the folder meanwhile.
"""

import os
import stat
import tarfile
from pathlib import Path

from isal import igzip

from common.printable import printable

MAX_NAME_CHARS = 200  # of a file name in a message
PACKING_LEVEL = 1  # ISA-L's levels are 0-3; 1 is its default, and beyond it each level is much slower for ~2 % less


class OutputTooLarge(Exception):
    pass


class OutputUnreadable(Exception):
    """A folder or entry of the output could not be read (no permission, a path longer than the system
    allows); the message names it, printable."""


def walk_output(folder):
    """(relative POSIX path, lstat) of everything below folder, each folder before what it holds, sorted by
    name within a folder. Never follows links. Walked with a list of folders still to read, not by recursion:
    an algorithm's deep tree costs list entries, not stack frames. Raises OutputUnreadable."""
    root = os.fsdecode(folder)
    folders = [""]
    while folders:
        current = folders.pop()
        reading = current
        try:
            with os.scandir(os.path.join(root, current) if current else root) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
            inner = []
            for entry in entries:
                reading = relative = f"{current}/{entry.name}" if current else entry.name
                info = entry.stat(follow_symlinks=False)
                yield relative, info
                if stat.S_ISDIR(info.st_mode):
                    inner.append(relative)
            folders.extend(reversed(inner))
        except OSError as error:
            what = f"the output's {shown_path(reading)}" if reading else "the output folder"
            raise OutputUnreadable(f"it cannot read {what}: {printable(error.strerror or str(error))}") from error


def shown_path(path):
    """A path from the algorithm as a message may show it: printable, cut short."""
    text = printable(path)
    return text if len(text) <= MAX_NAME_CHARS else text[:MAX_NAME_CHARS - 3] + "..."


def output_size(folder):
    """Bytes in regular files below folder, not following links. Raises OutputUnreadable."""
    return sum(info.st_size for _path, info in walk_output(folder) if stat.S_ISREG(info.st_mode))


def too_large_reason(size, max_bytes):
    """The run's failure reason when its output is over the site's limit (pure)."""
    if size > max_bytes:
        return f"output is {size} bytes, over this site's limit of {max_bytes} bytes"
    return None


def pack_output(folder, archive_path, max_bytes):
    """Write folder as a .tar.gz; returns the relative paths skipped (links and special files).
    Raises OutputTooLarge, or OutputUnreadable for an output it cannot read whole.

    The archive appears under its name only when complete, so a crash never leaves half of one. It is plain
    gzip, which any researcher's gzip reads, written by ISA-L at level 1: on CSV-like text ~30 times as fast as
    zlib's level 9, for an archive ~8 % larger, and data that does not shrink (an already compressed file,
    encrypted data) goes ~9 times as fast, stored nearly as it is (bench/packing.py, docs/performance.md).
    """
    folder, archive_path = Path(folder), Path(archive_path)
    reason = too_large_reason(output_size(folder), max_bytes)
    if reason:
        raise OutputTooLarge(reason)
    skipped = []
    partial = archive_path.with_name(archive_path.name + ".partial")
    with igzip.open(partial, "wb", compresslevel=PACKING_LEVEL) as packed, \
            tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relative, info in walk_output(folder):
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                try:
                    archive.add(os.path.join(os.fsdecode(folder), relative), arcname=relative, recursive=False)
                except OSError as error:
                    raise OutputUnreadable(f"it cannot read the output's {shown_path(relative)}: "
                                           f"{printable(error.strerror or str(error))}") from error
            else:
                skipped.append(relative)
    os.replace(partial, archive_path)
    return skipped
