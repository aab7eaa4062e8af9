"""What the site runner's tests share: their images, and reading what a site reported.

The images are small, most of them hostile: one folder each, with a Dockerfile on top of the
base image (ARG BASE). They are built with the docker SDK and pushed to the local image
registry, so the runner pulls them for real.
"""

import functools
import io
import json
import os
import tarfile
import time
from pathlib import Path

import docker
import pytest
import requests

from scripts.federation import IMAGE_REGISTRY
from scripts.images import engine_login

FOLDER = Path(__file__).resolve().parent
BASE_IMAGE = os.environ.get("PHT_BASE_IMAGE", "pht-base:bookworm")


def algorithm_containers(site_name, work_dir):
    """A runner's algorithm containers, not its SPARQL relays (a relay may be kept for its session's next run)."""
    return _containers_of(site_name, work_dir, relays=False)


def relay_ids(site_name, work_dir):
    """The ids of a runner's SPARQL relay containers (its runs', and those kept for their sessions' next runs)."""
    return {container.id for container in _containers_of(site_name, work_dir, relays=True)}


def _containers_of(site_name, work_dir, relays):
    from client import containers
    return [container for container in containers.containers_of(engine_or_fail(), site_name, work_dir)
            if (containers.ROLE_LABEL in container.labels) == relays]


def netns_of_container(container_id):
    """The network namespace of a running container's main process, as the sparql-probe names it (None if it is
    not running, or gone: a runner removes relays as it goes)."""
    try:
        state = engine_or_fail().api.inspect_container(container_id)["State"]
    except docker.errors.NotFound:
        return None
    return os.readlink(f"/proc/{state['Pid']}/ns/net") if state.get("Running") else None


def wait_until_cleaned_up(work_dir, timeout=60):
    """Until the runner has cleaned up after its runs (a run's relay is kept a moment after its result is in)."""
    runs = Path(work_dir) / "runs"
    wait_until(lambda: runs.exists() and not any(runs.iterdir()), "the runner has cleaned up after its runs", timeout)


def engine_or_fail():
    try:
        engine = docker.from_env()
        engine.ping()
        engine.images.get(BASE_IMAGE)
        # With the engine's login: the registry lets nobody else in (scripts/setup.sh).
        requests.get(f"http://{IMAGE_REGISTRY}/v2/", auth=engine_login(IMAGE_REGISTRY), timeout=5).raise_for_status()
    except (docker.errors.DockerException, requests.RequestException) as error:
        pytest.fail(f"the Docker engine, the base image {BASE_IMAGE} or the image registry at {IMAGE_REGISTRY} "
                    f"is missing ({error}); run scripts/setup.sh first")
    return engine


@functools.cache
def pushed_test_image(name, reference=None, **buildargs):
    """Build tests/images/<name>, push it as reference (default <registry>/pht/<name>:latest); returns that."""
    reference = reference or f"{IMAGE_REGISTRY}/pht/{name}:latest"
    built_test_image(name, reference, **buildargs)
    for line in engine_or_fail().images.push(reference, stream=True, decode=True):
        if "error" in line:
            pytest.fail(f"pushing {reference} failed: {line['error']}")
    return reference


def pinned_test_image(name):
    """Build and push tests/images/<name>; returns its reference pinned by digest (name:tag@sha256:...), as the
    researcher library posts it and sites require it by default (require_digest)."""
    reference = pushed_test_image(name)
    return f"{reference}@{registry_digest(reference)}"


def built_test_image(name, reference, **buildargs):
    """Build tests/images/<name> as reference, only into the local engine; returns the image."""
    image, _log = engine_or_fail().images.build(path=str(FOLDER / name), tag=reference, rm=True, network_mode="none",
                                                buildargs={"BASE": BASE_IMAGE, **buildargs})
    return image


def present(engine, reference):
    """Whether the image is in the local engine."""
    try:
        engine.images.get(reference)
        return True
    except docker.errors.ImageNotFound:
        return False


def registry_digest(reference):
    """The digest the image registry serves for host/repository:tag now."""
    name, _, tag = reference.rpartition(":")
    host, _, repository = name.partition("/")
    response = requests.head(f"http://{host}/v2/{repository}/manifests/{tag}", auth=engine_login(host), timeout=5,
                             headers={
        "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    response.raise_for_status()
    return response.headers["Docker-Content-Digest"]


def wait_until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


# --- reading what a site reported, over the registry's researcher API (docs/api.md) ------------

def run_of(federation, task):
    """The task's one run, as it is now."""
    [run] = federation.researcher().task(task["id"])["runs"]
    return run


def wait_for_runs(federation, task, timeout_seconds=60):
    """The task's runs once each has ended."""
    return federation.researcher().wait(task["id"], timeout_seconds=timeout_seconds)["runs"]


def only_run(federation, task, timeout_seconds=60):
    [run] = wait_for_runs(federation, task, timeout_seconds)
    return run


def output_files(federation, run):
    """Every member of the run's output archive: path -> bytes (None for folders and anything else)."""
    archive = _download(federation, f"/api/runs/{run['id']}/output")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        return {member.name: tar.extractfile(member).read() if member.isfile() else None
                for member in tar.getmembers()}


def output_json(federation, run, name):
    return json.loads(output_files(federation, run)[name])


def run_log(federation, run):
    return _download(federation, f"/api/runs/{run['id']}/log").decode("utf-8", "replace")


def history(federation, run):
    """The states the run went through, in order: [{"status": ..., "at": ..., "reason": ...}, ...]."""
    return json.loads(_download(federation, f"/api/runs/{run['id']}/history"))


def states(federation, run):
    return [event["status"] for event in history(federation, run)]


def site_status(federation, name):
    """The registry's view of a site: online, last_seen_at, sparql_ok, ..."""
    [site] = [site for site in json.loads(_download(federation, "/api/sites?per_page=200"))["items"]
              if site["name"] == name]
    return site


def _download(federation, path):
    researcher = federation.researcher()
    response = researcher.http.get(researcher.url + path, timeout=60)
    response.raise_for_status()
    return response.content
