"""Hard limits on what an algorithm can write: a filesystem of fixed size per run and per session.

An algorithm writes to /output (and /output.txt, /log.txt) and to its session's /temp.
Counting those bytes while it runs would let it write gigabytes between two checks, so
each gets a small ext4 filesystem of its own, in a sparse image file, loop-mounted where
the runner binds it from:

    work_dir/runs/<run>/disk.img          mounted at runs/<run>/disk/ (output/, pytaskmanager-log.txt)
    work_dir/sessions/<session>/disk.img  mounted at sessions/<session>/temp/

A full filesystem answers the algorithm's next write with "No space left on device"; the
site's disk never holds more than the image's size. The images are sized once at start-up
(calibrate): as small as gives the algorithm at least the configured bytes and files.
What the site's disk can hold beyond the configured bytes is ext4's own bookkeeping
(256 bytes per allowed file, bitmaps, the kernel's reserve), logged at start-up and
written down in docs/site-config.md.

Mounting needs root (CAP_SYS_ADMIN) and mkfs.ext4 (e2fsprogs); a runner without them
refuses to start unless the site chose container.disk_limits "polling". Mounts outlive a
restarted runner (it finds them mounted and carries on), and a rebooted machine's images
are mounted again when next needed: a session's /temp keeps what earlier rounds left.
"""

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pht.runner")

IMAGE_NAME = "disk.img"
BLOCK_BYTES = 4096
INODE_BYTES = 256
# ext4 keeps inodes 1-10 for itself (2 is the root folder); lost+found, the 11th, is removed.
RESERVED_INODES = 10
MIB = 1024 ** 2
# ext4 refuses an unprivileged writer the last few dozen KiB (it keeps them for its own allocations):
# each filesystem has this much room beyond its limit, and counts as full once less than this is left.
FULL_MARGIN_BYTES = MIB
# Images are sized in steps of this: an algorithm may store up to FULL_MARGIN_BYTES + STEP_BYTES more than
# its limit, and a run fails as over its limit only if it used more than the limit.
STEP_BYTES = 256 * 1024
# No journal: the filesystem lives as long as a run or a session, and one lost in a crash loses
# only a run's files. nosuid and nodev: nothing an algorithm leaves there means more than data.
MKFS_OPTIONS = ["-q", "-F", "-b", str(BLOCK_BYTES), "-m", "0", "-O", "^has_journal",
                "-E", "lazy_itable_init=1,nodiscard"]
# noinit_itable: the kernel would otherwise zero every inode table in the background, writing
# 256 bytes per allowed file to the site's disk whether or not the algorithm uses them.
# nodelalloc: blocks are allocated as they are written; with delayed allocation a write can fail
# with a few hundred KiB still free, depending on the machine's CPUs.
MOUNT_OPTIONS = "loop,nosuid,nodev,noinit_itable,nodelalloc"


class DiskLimitsUnavailable(Exception):
    """This machine cannot make or mount the filesystems; the message names the fix."""


class DiskProblem(Exception):
    """A run's or session's filesystem could not be made, mounted or unmounted."""


@dataclass(frozen=True)
class DiskSize:
    """A filesystem that holds at least max_bytes in at least max_files files, in an image of image_bytes."""
    max_bytes: int
    max_files: int
    image_bytes: int

    @property
    def overshoot_bytes(self):
        """How much more than max_bytes the site's disk may hold for it, at most."""
        return self.image_bytes - self.max_bytes


def first_guess(max_bytes, max_files):
    """An image size likely to be close: the data, the inode tables, ext4's reserve (min(2 %, 16 MiB) at mount)."""
    reserve = min(max_bytes // 50, 16 * MIB)
    return _whole_steps(max_bytes + INODE_BYTES * (max_files + RESERVED_INODES) + reserve + MIB)


def next_guess(image_bytes, max_bytes, available_bytes):
    """The next image size to try after one that gave available_bytes; None if that one gives at least
    max_bytes and less than STEP_BYTES more (pure)."""
    if max_bytes <= available_bytes < max_bytes + STEP_BYTES:
        return None
    return _whole_steps(image_bytes + max_bytes - available_bytes)


def _whole_steps(size):
    return -(-size // STEP_BYTES) * STEP_BYTES


def calibrate(scratch_dir, max_bytes, max_files, attempts=6):
    """The image size for these limits, found by making and mounting the filesystem (so this also checks
    that this machine can). Raises DiskLimitsUnavailable."""
    if os.geteuid() != 0:
        raise DiskLimitsUnavailable("container.disk_limits filesystem mounts a filesystem per run and per session, "
                                    "which needs root: run the runner as root, or set container.disk_limits to "
                                    "polling (output checked every 2 s, /temp not limited)")
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if _tool(tool) is None]
    if missing:
        raise DiskLimitsUnavailable(f"container.disk_limits filesystem needs {', '.join(missing)}: install e2fsprogs "
                                    "and mount (apt-get install e2fsprogs mount), or set container.disk_limits to "
                                    "polling")
    scratch_dir = Path(scratch_dir)
    room_bytes = max_bytes + FULL_MARGIN_BYTES
    image_bytes, big_enough = first_guess(room_bytes, max_files), None
    for _ in range(attempts):
        # A runner killed while it sized its filesystems left one mounted here.
        release_all_under(scratch_dir)
        shutil.rmtree(scratch_dir, ignore_errors=True)
        scratch_dir.mkdir(parents=True)
        mountpoint = scratch_dir / "mounted"
        try:
            mount(scratch_dir / IMAGE_NAME, mountpoint, DiskSize(max_bytes, max_files, image_bytes))
            available_bytes, available_files = free_space(mountpoint)
        except DiskProblem as error:
            raise DiskLimitsUnavailable(f"{error}; set container.disk_limits to polling if this machine cannot "
                                        "mount loop devices") from None
        finally:
            release(mountpoint)
            shutil.rmtree(scratch_dir, ignore_errors=True)
        if available_files < max_files:
            raise DiskLimitsUnavailable(f"a filesystem made for {max_files} files holds only {available_files}")
        size = DiskSize(max_bytes, max_files, image_bytes)
        if available_bytes >= room_bytes and (big_enough is None or size.image_bytes < big_enough.image_bytes):
            big_enough = size
        image_bytes = next_guess(image_bytes, room_bytes, available_bytes)
        if image_bytes is None:
            return size
    if big_enough is None:
        raise DiskLimitsUnavailable(f"no filesystem size found that holds {max_bytes} bytes")
    return big_enough  # ext4's overhead moved with each size tried: the smallest that held enough


def mount(image, mountpoint, size):
    """Mount image at mountpoint, making the image (empty) first if there is none. Nothing happens if it is
    mounted already: a restarted runner finds its runs' and sessions' filesystems as it left them.
    Raises DiskProblem."""
    image, mountpoint = Path(image), Path(mountpoint)
    if os.path.ismount(mountpoint):
        return
    made = not image.exists()
    if made:
        new = image.with_name(image.name + ".new")
        with open(new, "wb") as sparse:
            sparse.truncate(size.image_bytes)
        _run(["mkfs.ext4", *MKFS_OPTIONS, "-N", str(size.max_files + RESERVED_INODES), str(new)])
        os.replace(new, image)  # made whole, or not there: a crash never leaves half an image behind
    mountpoint.mkdir(exist_ok=True)
    _run(["mount", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)])
    if made:
        # One inode back, and no folder in the algorithm's view that it cannot use. Only on a new filesystem: on
        # one mounted again, a lost+found is the algorithm's own folder.
        (mountpoint / "lost+found").rmdir()


def release(mountpoint):
    """Unmount if mounted. Raises DiskProblem if it is still in use (a container still has it)."""
    if os.path.ismount(mountpoint):
        _run(["umount", str(mountpoint)])


def remove_folder(folder):
    """Delete a run's or session's folder, unmounting its filesystem first. Raises DiskProblem if the filesystem
    is still in use. rm, not shutil.rmtree: an algorithm's tree (with disk_limits polling, on the site's own
    disk) may be deeper than Python's recursion limit; and rm does not cross into a filesystem still mounted."""
    folder = Path(folder)
    for mountpoint in (folder / "disk", folder / "temp"):
        release(mountpoint)
    if folder.exists() or folder.is_symlink():
        _run(["rm", "-rf", "--one-file-system", "--", str(folder)])


def free_space(mountpoint):
    """(bytes, files) an unprivileged writer can still add."""
    usage = os.statvfs(mountpoint)
    return usage.f_bavail * usage.f_frsize, usage.f_favail


def full_reason(mountpoint, what, size):
    """Why the filesystem at mountpoint counts as full, or None: no file left, or less than FULL_MARGIN_BYTES,
    which it has only once more than max_bytes were used. A plain folder, where the site polls, is never full."""
    if not os.path.ismount(mountpoint):
        return None
    available_bytes, available_files = free_space(mountpoint)
    if available_files == 0:
        return f"{what} reached this site's limit of {size.max_files} files"
    if available_bytes < FULL_MARGIN_BYTES:
        return f"{what} reached this site's limit of {size.max_bytes} bytes"
    return None


def mounted_under(folder):
    """Every mountpoint below folder, deepest first."""
    folder = os.path.realpath(folder)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as mounts:
        for line in mounts:
            # Field 5 is the mountpoint, with space, tab, newline and backslash written as octal escapes.
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(folder + os.sep):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def release_all_under(folder):
    """Unmount every filesystem below folder, lazily (detached now, freed once unused), before deleting it:
    for whoever drops a whole work dir (tests, demos). Returns how many there were."""
    mountpoints = mounted_under(folder)
    for mountpoint in mountpoints:
        _run(["umount", "--lazy", mountpoint])
    return len(mountpoints)


def _tool(name):
    """The tool's path: system tools live in sbin, which not every user's PATH has."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def _run(command):
    try:
        subprocess.run([_tool(command[0]) or command[0], *command[1:]], check=True, capture_output=True, timeout=120)
    except subprocess.CalledProcessError as error:
        said = (error.stderr or error.stdout or b"").decode("utf-8", "replace").strip()
        raise DiskProblem(f"{command[0]} failed: {said or f'exit code {error.returncode}'}") from None
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DiskProblem(f"{command[0]} failed: {error}") from None
