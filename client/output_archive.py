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


class OutputTooLarge(Exception):
    pass


def output_size(folder):
    """Bytes in regular files below folder, not following links."""
    total = 0
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            info = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def too_large_reason(size, max_bytes):
    """The run's failure reason when its output is over the site's limit (pure)."""
    if size > max_bytes:
        return f"output is {size} bytes, over this site's limit of {max_bytes} bytes"
    return None


def pack_output(folder, archive_path, max_bytes):
    """Write folder as a .tar.gz; returns the relative paths skipped (links and special files).

    The archive appears under its name only when complete, so a crash never leaves half of one.
    """
    folder, archive_path = Path(folder), Path(archive_path)
    reason = too_large_reason(output_size(folder), max_bytes)
    if reason:
        raise OutputTooLarge(reason)
    skipped = []
    partial = archive_path.with_name(archive_path.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        # os.walk lists links to folders among dirs but, without followlinks, does not descend into them.
        for root, dirs, files in os.walk(folder, followlinks=False):
            for name in sorted(dirs) + sorted(files):
                path = Path(root) / name
                relative = path.relative_to(folder).as_posix()
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                    archive.add(path, arcname=relative, recursive=False)
                else:
                    skipped.append(relative)
    os.replace(partial, archive_path)
    return skipped
