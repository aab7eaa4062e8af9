"""Build the images the demo and the tests use, and push the algorithm images to the local registry.

1. The base image (PHT_BASE_IMAGE, default pht-base:bookworm), only when it is missing: a minimal
   Debian bookworm made with debootstrap, with python3, numpy and SPARQLWrapper from Debian. Built
   from Debian packages rather than pulled from Docker Hub because this machine only reaches the
   Debian and PyPI mirrors.
2. Every algorithms/<name>/ folder with a Dockerfile, built on the base image as
   <PHT_IMAGE_REGISTRY>/pht/<name with _ as ->:latest and pushed there. The build cache makes
   rebuilding unchanged algorithms cheap, so they are rebuilt on every run.

The registry only lets its account in; pushes go with the engine's login, which scripts/setup.sh
made from the account in .local/image-registry/push-credentials (`docker login`). The helpers
for that login are here so the set-up and the tests read it one way.

Run by scripts/setup.sh; running it alone is fine once the engine and registry are up.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import docker
import docker.auth
import requests
from docker.utils import parse_repository_tag

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / ".local"
LOGS = LOCAL / "logs"
ALGORITHMS = ROOT / "algorithms"

REGISTRY = os.environ.get("PHT_IMAGE_REGISTRY", "127.0.0.1:5050")
# The local registry's one account, "user:password", made by scripts/setup.sh.
REGISTRY_CREDENTIALS = LOCAL / "image-registry" / "push-credentials"
BASE_IMAGE = os.environ.get("PHT_BASE_IMAGE", "pht-base:bookworm")

DEBIAN_SUITE = "bookworm"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ["python3", "python3-numpy", "python3-sparqlwrapper"]
APT_SOURCES = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]

# Left out of the image: docker provides /dev and /proc at run time, and the package caches are
# only dead weight in a base image.
ROOTFS_EXCLUDES = ["./dev/*", "./proc/*", "./sys/*", "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*"]

# Algorithm images never need the network at run time, but a RUN step may pip install (for bases
# other than ours). The engine has no bridge network, so host is the only mode with network access.
BUILD_NETWORK_MODE = "host"


class SetupError(Exception):
    """A problem the user has to fix; the message says how."""


def mirror_from_sources(text, suite=DEBIAN_SUITE):
    """The first mirror URI serving `suite` in an apt sources text (deb822 or one-line format)."""
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            key, sep, value = line.partition(":")
            if sep and not line.startswith((" ", "#")):
                fields[key.strip().lower()] = value.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []) and fields.get("uris"):
            return fields["uris"][0]
    for line in text.splitlines():
        words = [word for word in line.split() if not (word.startswith("[") or word.endswith("]"))]
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            return words[1]
    return None


def debian_mirror():
    for sources in APT_SOURCES:
        if sources.exists():
            mirror = mirror_from_sources(sources.read_text(encoding="utf-8"))
            if mirror:
                return mirror
    return DEFAULT_DEBIAN_MIRROR


def algorithm_image_name(folder_name):
    return f"{REGISTRY}/pht/{folder_name.replace('_', '-')}"


def connect_to_engine(timeout=60):
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except docker.errors.DockerException as error:
        raise SetupError(
            f"docker engine not reachable ({error}); run scripts/setup.sh, which starts "
            "`dockerd --bridge=none --iptables=false`"
        ) from None
    return client


def engine_login(registry=REGISTRY):
    """(user, password) the engine's clients send to the registry: what `docker login` stored in
    ~/.docker/config.json (or a credential helper), as docker-py reads it for pulls and pushes; or None."""
    found = docker.auth.resolve_authconfig(docker.auth.load_config(), registry) or {}
    found = {key.lower(): value for key, value in found.items()}  # credential helpers' answers are capitalised
    return (found["username"], found["password"]) if found.get("username") else None


def local_credentials():
    """(user, password) of the local registry's account, or None before scripts/setup.sh made it."""
    try:
        user, _, password = REGISTRY_CREDENTIALS.read_text(encoding="utf-8").strip().partition(":")
    except FileNotFoundError:
        return None
    return user, password


def registry_status(credentials, registry=REGISTRY):
    """The HTTP status of the registry's GET /v2/ with (user, password), or without when None: 200 lets
    them in, 401 asks for (other) credentials. None when nothing answers."""
    try:
        return requests.get(f"http://{registry}/v2/", auth=credentials, timeout=5).status_code
    except requests.RequestException:
        return None


def check_registry():
    url = f"http://{REGISTRY}/v2/"
    status = registry_status(engine_login())
    if status is None:
        raise SetupError(
            f"image registry not reachable at {url}; run scripts/setup.sh, which starts "
            "docker-registry there, or set PHT_IMAGE_REGISTRY to a running registry"
        )
    if status == 401:
        raise SetupError(
            f"the image registry at {url} refuses the Docker engine's login (or it has none), so pushes would "
            f"fail; run scripts/setup.sh, which logs in with {REGISTRY_CREDENTIALS}, or `docker login {REGISTRY}`"
        )
    if status != 200:
        raise SetupError(f"{url} answered HTTP {status}, not 200; is a docker-registry listening there?")


def image_exists(client, name):
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def mounts_under(folder):
    """Mount points inside `folder`, deepest first (debootstrap may leave /proc, /sys or /dev binds)."""
    prefix = str(folder) + "/"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        points = [line.split()[1] for line in mounts]
    return sorted((point for point in points if point.startswith(prefix)), reverse=True)


def remove_rootfs(folder):
    # Unmount first: deleting through a leftover bind mount would delete files on the host.
    for point in mounts_under(folder):
        subprocess.run(["umount", "--lazy", point], check=True)
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        print(f"images: warning: could not remove {folder} completely; delete it by hand (rm -rf)", file=sys.stderr)


def debootstrap(rootfs, mirror, log_path):
    command = [
        "debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
        DEBIAN_SUITE, str(rootfs), mirror,
    ]
    print(f"images: {' '.join(command)} (about a minute; log in {log_path})", flush=True)
    with open(log_path, "w", encoding="utf-8") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if finished.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(True)[-15:])
        raise SetupError(f"debootstrap failed (exit {finished.returncode}); end of {log_path}:\n{tail}")


def import_rootfs(client, rootfs, image_name):
    """`docker import` of the folder, streamed through tar so no tarball lands on disk."""
    repository, tag = parse_repository_tag(image_name)
    excludes = [f"--exclude={pattern}" for pattern in ROOTFS_EXCLUDES]
    tar = subprocess.Popen(
        ["tar", "-C", str(rootfs), "--numeric-owner", *excludes, "-c", "."], stdout=subprocess.PIPE
    )
    chunks = iter(lambda: tar.stdout.read(1 << 20), b"")
    response = client.api.import_image(
        src=chunks, stream_src=True, repository=repository, tag=tag or "latest", changes=['CMD ["python3"]']
    )
    tar.stdout.close()
    if tar.wait() != 0:
        raise SetupError(f"tar of {rootfs} failed (exit {tar.returncode}); see the message above")
    for line in str(response).splitlines():
        message = json.loads(line) if line.startswith("{") else {}
        if "error" in message:
            raise SetupError(f"docker import of {rootfs} failed: {message['error']}")


def build_base_image():
    if os.geteuid() != 0:
        raise SetupError(
            f"base image {BASE_IMAGE} is missing and building it needs root (debootstrap); "
            "run scripts/setup.sh as root, or set PHT_BASE_IMAGE to an image with python3"
        )
    LOGS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="base-image-", dir=LOCAL))
    try:
        rootfs = workdir / "rootfs"
        debootstrap(rootfs, debian_mirror(), LOGS / "debootstrap.log")
        print(f"images: importing {rootfs} as {BASE_IMAGE}", flush=True)
        # The import sends the whole root filesystem before the engine replies, so allow for it.
        import_rootfs(connect_to_engine(timeout=600), rootfs, BASE_IMAGE)
    finally:
        remove_rootfs(workdir)


def remove_replaced_image(client, image_id):
    # After a base rebuild the old algorithm image keeps the old ~200 MB base alive; drop it
    # unless a container still uses it.
    try:
        client.images.remove(image_id)
    except docker.errors.APIError:
        pass


def build_algorithm(client, folder):
    name = algorithm_image_name(folder.name)
    previous = client.images.get(f"{name}:latest").id if image_exists(client, f"{name}:latest") else None
    try:
        image, _log = client.images.build(
            path=str(folder), tag=f"{name}:latest", buildargs={"BASE": BASE_IMAGE},
            network_mode=BUILD_NETWORK_MODE, rm=True,
        )
    except docker.errors.BuildError as error:
        log = "".join(entry.get("stream", "") or entry.get("error", "") for entry in error.build_log)
        raise SetupError(f"building {folder} failed: {error.msg}\n{log}") from None
    if previous and previous != image.id:
        remove_replaced_image(client, previous)
    return name


def push(client, name):
    digest = None
    for message in client.images.push(name, tag="latest", stream=True, decode=True):
        if "error" in message:
            raise SetupError(f"pushing {name}:latest failed: {message['error']}")
        digest = message.get("aux", {}).get("Digest", digest)
    return digest


def main():
    client = connect_to_engine()
    if image_exists(client, BASE_IMAGE):
        print(f"images: base image {BASE_IMAGE} already present")
    else:
        build_base_image()
        print(f"images: built base image {BASE_IMAGE}")
    check_registry()
    for dockerfile in sorted(ALGORITHMS.glob("*/Dockerfile")):
        name = build_algorithm(client, dockerfile.parent)
        digest = push(client, name)
        print(f"images: pushed {name}:latest {digest}")


if __name__ == "__main__":
    try:
        main()
    except SetupError as error:
        sys.exit(f"images: {error}")
