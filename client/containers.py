"""Pulling and running algorithm images with the Docker engine, contained.

Every container gets: no network unless the site chose one, a read-only root
filesystem, no capabilities, no-new-privileges, a non-root user, memory/CPU/pids
limits and a wall-clock timeout. The Docker socket is never mounted into it.
"""

import logging
import time

import docker
import requests

log = logging.getLogger("pht.runner")

LABEL_PREFIX = "org.personalhealthtrain."


class ContainerOutcome:
    def __init__(self, exit_code=None, failure_reason=None):
        self.exit_code = exit_code
        self.failure_reason = failure_reason


def connect_engine():
    client = docker.from_env()
    client.ping()
    return client


def pull_image(engine, reference):
    """Pull the image (always, so a moved tag is picked up); returns the reference pinned by digest."""
    image = engine.images.pull(reference.name, tag=reference.digest or reference.tag or "latest")
    return pinned_reference(image, reference)


def pinned_reference(image, reference):
    """name@sha256:... as the registry knows the image we have; running it cannot pick up a moved tag."""
    for repo_digest in image.attrs.get("RepoDigests") or []:
        name, _, digest = repo_digest.partition("@")
        if name in (reference.name, reference.repository, reference.repository.removeprefix("library/")):
            return f"{reference.name}@{digest}"
    # A loaded image that no registry has seen has no repo digest; its content id pins it as well.
    return image.id


def run_contained(engine, image, mounts, environment, limits, labels, timeout_seconds, should_stop, log_path):
    """Run the image to its end (or until timeout / should_stop()); the log goes to log_path."""
    container = engine.containers.run(
        image,
        detach=True,
        volumes={str(host): {"bind": inside, "mode": mode} for host, inside, mode in mounts},
        environment=environment,
        labels=labels,
        network_mode=limits.network,
        read_only=True,
        tmpfs={"/tmp": "rw,size=64m"},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        user=limits.user,
        mem_limit=limits.memory,
        memswap_limit=limits.memory,
        nano_cpus=int(limits.cpus * 1e9),
        pids_limit=limits.pids,
    )
    try:
        outcome = _wait(container, timeout_seconds, should_stop)
        _save_log(container, log_path)
        return outcome
    finally:
        container.remove(force=True)


def _wait(container, timeout_seconds, should_stop):
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            status = container.wait(timeout=1)
            return ContainerOutcome(exit_code=status["StatusCode"])
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            pass
        if should_stop():
            container.kill()
            return ContainerOutcome(failure_reason="cancelled while running")
        if time.monotonic() > deadline:
            container.kill()
            return ContainerOutcome(failure_reason=f"timeout: still running after {timeout_seconds} s")


def _save_log(container, log_path):
    with open(log_path, "wb") as log_file:
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=False):
            log_file.write(chunk)
