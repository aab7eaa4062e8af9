"""Packing an algorithm's /output folder for upload.

Only regular files and folders go in. Symbolic links are never followed nor
stored, so an algorithm cannot make the runner send a file from outside its
output folder (a link to /etc/passwd, say); what was skipped is listed so the
run log can say so.
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


def pack_output(folder, archive_path, max_bytes):
    """Write folder as a .tar.gz; returns the relative paths skipped (links and special files)."""
    folder = Path(folder)
    size = output_size(folder)
    if size > max_bytes:
        raise OutputTooLarge(f"output is {size} bytes, over this site's limit of {max_bytes} bytes")
    skipped = []
    with tarfile.open(archive_path, "w:gz") as archive:
        for root, dirs, files in os.walk(folder, followlinks=False):
            for name in sorted(dirs) + sorted(files):
                path = Path(root) / name
                relative = path.relative_to(folder).as_posix()
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                    archive.add(path, arcname=relative, recursive=False)
                else:
                    skipped.append(relative)
            # os.walk lists links to folders among dirs but does not descend into them.
    return skipped
