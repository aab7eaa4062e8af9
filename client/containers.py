"""Running algorithm images with the Docker engine, contained.

Every container gets: no network unless the site chose one, a read-only root
filesystem, no capabilities, no-new-privileges, a non-root user, memory/CPU/pids
limits and a capped log; while it runs, the runner checks its own reasons to stop
it (timeout, cancel, output size). The Docker socket is never mounted into it.
Containers carry labels naming the site, task and run, so a restarted runner
finds the ones it started before.

With the default network (none), each run also gets a SPARQL relay container, started
first; the algorithm's container joins its network namespace (network_mode
container:<relay>), where the relay listens on 127.0.0.1 and passes connections to the
runner's gateway over a Unix socket. A namespace of its own and no Docker network
(the engine may have no bridge), and nothing from Docker Hub: the relay's image is built
here on the site's base image.
"""

import hashlib
import io
import logging
import tarfile
import time
from pathlib import Path

import docker
import requests

log = logging.getLogger("pht.runner")

LABEL_PREFIX = "org.personalhealthtrain."
SITE_LABEL = LABEL_PREFIX + "site"
TASK_LABEL = LABEL_PREFIX + "task"
RUN_LABEL = LABEL_PREFIX + "run"
WORK_DIR_LABEL = LABEL_PREFIX + "work_dir"
ROLE_LABEL = LABEL_PREFIX + "role"  # "sparql-relay" on relays; algorithms' containers have none

RELAY_FOLDER = Path(__file__).resolve().parent / "sparql_relay"
RELAY_FILES = ("Dockerfile", "relay.py")
RELAY_IMAGE = "pht-sparql-relay"
RELAY_UID = 65534
RELAY_USER = f"{RELAY_UID}:{RELAY_UID}"
RELAY_READY = b"relay ready"

# An algorithm that prints without end must not fill the site's disk: Docker keeps the last
# this-many bytes of its output. The runner follows it as it comes and keeps the log's beginning
# and end (log_keeper.py).
MAX_LOG_BYTES = "50m"


def connect_engine():
    client = docker.from_env()
    # No proxy, .netrc or CA bundle from the environment applies to the engine's socket; looking them up for every
    # call was a tenth of the runner's CPU.
    client.api.trust_env = False
    client.ping()
    return client


def network_problem(engine, network):
    """Why the configured container network cannot be used, or None."""
    if network in ("none", "host"):
        return None
    try:
        engine.networks.get(network)
    except docker.errors.NotFound:
        return (f"container.network {network!r} is not a Docker network on this machine; "
                "create it (docker network create) or use none or host")
    return None


def cpus_problem(engine, cpus):
    available = engine.info().get("NCPU") or 0
    if cpus > available:
        return f"container.cpus {cpus} is more than the {available} CPUs this Docker engine has; lower it"
    return None


def image_details(image):
    """What the IT officer sees of an image (docker Image) before approving it: its id, labels, size and creation
    date, as this machine's engine has them (the image's own words: labels are printed printable only)."""
    attributes = image.attrs
    return {"id": attributes.get("Id"), "labels": (attributes.get("Config") or {}).get("Labels") or {},
            "size": attributes.get("Size"), "created": attributes.get("Created"),
            "repo_digests": attributes.get("RepoDigests") or []}


def labels_for(site_name, work_dir, task_id, run_id):
    return {SITE_LABEL: site_name, WORK_DIR_LABEL: str(work_dir), TASK_LABEL: str(task_id), RUN_LABEL: str(run_id)}


def containers_of(engine, site_name, work_dir):
    """Every container this runner (this site and work dir) started, running or not."""
    return engine.containers.list(all=True, ignore_removed=True, filters={
        "label": [f"{SITE_LABEL}={site_name}", f"{WORK_DIR_LABEL}={work_dir}"]})


def find(engine, container_id):
    try:
        return engine.containers.get(container_id)
    except docker.errors.NotFound:
        return None


def create_contained(engine, image, mounts, environment, limits, labels, network_mode, command=None):
    """Create (not start) the container, so the runner can note its id before it runs."""
    return engine.containers.create(
        image,
        command,
        volumes={str(host): {"bind": inside, "mode": mode} for host, inside, mode in mounts},
        environment=environment,
        labels=labels,
        network_mode=network_mode,
        read_only=True,
        tmpfs={"/tmp": "rw,size=64m"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        user=limits.user,
        mem_limit=limits.memory,
        memswap_limit=limits.memory,
        nano_cpus=int(limits.cpus * 1e9),
        pids_limit=limits.pids,
        log_config={"type": "json-file", "config": {"max-size": MAX_LOG_BYTES, "max-file": "1"}},
    )


def relay_image(engine, base_image):
    """The relay's image, built on the site's base image unless present; its tag names what it was built from,
    so a changed relay or base is built anew. Raises docker.errors.ImageNotFound if the base is missing."""
    files = {name: (RELAY_FOLDER / name).read_bytes() for name in RELAY_FILES}
    built_from = hashlib.sha256(engine.images.get(base_image).id.encode())
    for name in RELAY_FILES:
        built_from.update(name.encode() + b"\0" + files[name])
    tag = f"{RELAY_IMAGE}:{built_from.hexdigest()[:16]}"
    try:
        engine.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    context.seek(0)
    log.info("building the SPARQL relay image %s on %s", tag, base_image)
    engine.images.build(fileobj=context, custom_context=True, tag=tag, buildargs={"BASE": base_image},
                        network_mode="none", pull=False, rm=True)
    return tag


def create_relay(engine, image, socket_dir, labels):
    """Create (not start) a run's relay: no network of its own, the gateway's socket folder read-only."""
    return engine.containers.create(
        image,
        volumes={str(socket_dir): {"bind": "/gateway", "mode": "ro"}},
        labels={**labels, ROLE_LABEL: "sparql-relay"},
        network_mode="none",
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        user=RELAY_USER,
        mem_limit="64m",
        memswap_limit="64m",
        pids_limit=16,
        nano_cpus=10 ** 9,
        log_config={"type": "json-file", "config": {"max-size": "1m", "max-file": "1"}},
    )


class RelayFailed(Exception):
    """The relay did not come up; the message says what it printed."""


def wait_until_listening(container, timeout_seconds=30):
    """Return once the relay says it listens; the algorithm must not start before (its first query would fail)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        container.reload()
        if RELAY_READY in container.logs(stdout=True, stderr=False):
            return
        if not has_not_ended(container) or time.monotonic() > deadline:
            output = container.logs(stdout=True, stderr=True)[-500:].decode("utf-8", "replace")
            raise RelayFailed(f"the SPARQL relay container did not start listening ({container.status}): {output}")
        time.sleep(0.01)


def has_not_ended(container):
    """Whether the container (as last reloaded) is still to start or running: Docker's states, not a run's."""
    return container.status in ("created", "running")


def is_running(engine, container_id):
    try:
        return engine.api.inspect_container(container_id)["State"]["Running"] is True
    except docker.errors.NotFound:
        return False


def start(container):
    """Start it if it is still to start, as last looked at (created, found, or reloaded by LogFollower.start): a
    restarted runner may find it running or ended, and an ended one must not run twice."""
    if container.status == "created":
        container.start()


def wait_for_end(container, reason_to_stop, poll_seconds=1):
    """Wait until the container exits, checking reason_to_stop() every poll_seconds meanwhile.

    Returns (exit code, None) when it ended on its own, or (None, reason) after killing it
    because reason_to_stop() gave a reason (the runner's: timeout, cancel, output too large).
    """
    while True:
        try:
            return container.wait(timeout=poll_seconds)["StatusCode"], None
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            pass
        reason = reason_to_stop()
        if reason:
            kill(container)
            return None, reason


def kill(container):
    try:
        container.kill()
    except docker.errors.APIError as error:  # it ended by itself meanwhile, or is already gone
        log.debug("kill of container %s: %s", container.short_id, error.explanation)


def was_out_of_memory(container):
    container.reload()
    return bool(container.attrs["State"].get("OOMKilled"))


def remove(engine, container_id):
    try:
        engine.api.remove_container(container_id, force=True)
    except docker.errors.NotFound:
        pass
