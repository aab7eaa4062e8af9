"""The local image registry's authentication, attacked the way an algorithm could (issue 12, item 7).

An algorithm at a site that lets containers onto the host network reaches the image registry on
127.0.0.1:5050 over plain HTTP. Without authentication it could push its own image over a trusted
tag, and the next task for that tag would run it. scripts/setup.sh runs the registry with htpasswd
authentication and one account (.local/image-registry/push-credentials), and logs the Docker
engine's clients in with it. These tests send the requests such an algorithm would, without the
account and with it, and look inside a container started the runner's way for any trace of it.

Nothing here writes to a repository other tests use: what the account pushes goes to
pht/auth-probe, under a tag and digest of this run's own, and is deleted again.
"""

import base64
import hashlib
import json
import uuid

import docker
import pytest
import requests

from client import containers
from client.site_config import CONTAINER_DEFAULTS, ContainerLimits
from scripts.images import BASE_IMAGE, REGISTRY, REGISTRY_CREDENTIALS, engine_login, local_credentials, registry_status

TRUSTED = "pht/patient-count"  # pushed by scripts/images.py; sites run it
PROBE = "pht/auth-probe"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"

# Run inside the container: its environment, and every readable file that holds one of the markers
# given as arguments (not secrets: the account's user name, and how its base64 form starts).
LOOK_FOR_THE_ACCOUNT = """
import json, os, sys
markers = [marker.encode() for marker in sys.argv[1:]]
holding = []
for folder, subfolders, files in os.walk("/"):
    if folder in ("/proc", "/sys", "/dev"):
        subfolders[:] = []
        continue
    for name in files:
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) < 1 << 20:
                with open(path, "rb") as file:
                    data = file.read()
                holding += [path] if any(marker in data for marker in markers) else []
        except OSError:
            pass
print(json.dumps({"environment": dict(os.environ), "holding": holding}))
"""


@pytest.fixture(scope="module")
def account():
    """(user, password) of the account the engine's clients use for the registry."""
    if local_credentials() is None:
        pytest.skip(f"no {REGISTRY_CREDENTIALS}: run scripts/setup.sh, which makes the registry's account and "
                    "starts the registry with authentication")
    if registry_status(None) is None:
        pytest.fail(f"no image registry answers at {REGISTRY}; run scripts/setup.sh, which starts it")
    login = engine_login()
    if login is None:
        pytest.fail(f"the Docker engine's clients have no login for {REGISTRY}; run scripts/setup.sh, which logs "
                    f"them in with {REGISTRY_CREDENTIALS}")
    return login


def url(path):
    return f"http://{REGISTRY}/v2/{path}"


def foreign_manifest():
    """A manifest of blobs the registry does not have: were it ever let in, it could not move a tag."""
    def descriptor(media_type, label):
        return {"mediaType": media_type, "size": 1, "digest": "sha256:" + hashlib.sha256(label).hexdigest()}
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": descriptor("application/vnd.oci.image.config.v1+json", b"attacker's config"),
                       "layers": [descriptor("application/vnd.oci.image.layer.v1.tar", b"attacker's layer")]})


def assert_refused(response):
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.headers["WWW-Authenticate"].startswith("Basic "), response.headers


def test_an_anonymous_upload_to_a_trusted_repository_is_refused(account):
    assert_refused(requests.post(url(f"{TRUSTED}/blobs/uploads/"), timeout=10))


def test_an_anonymous_manifest_over_a_trusted_tag_is_refused(account):
    assert_refused(requests.put(url(f"{TRUSTED}/manifests/latest"), data=foreign_manifest(), timeout=10,
                                headers={"Content-Type": OCI_MANIFEST}))


def test_anonymous_reads_are_refused_too(account):
    for path in ("", "_catalog", f"{TRUSTED}/tags/list", f"{TRUSTED}/manifests/latest"):
        assert_refused(requests.get(url(path), timeout=10))


def test_a_guessed_password_is_refused(account):
    user, password = account
    assert_refused(requests.post(url(f"{TRUSTED}/blobs/uploads/"), auth=(user, password + "x"), timeout=10))
    assert_refused(requests.post(url(f"{TRUSTED}/blobs/uploads/"), auth=("admin", password), timeout=10))


def upload_blob(session, data):
    """Monolithic upload (POST, then PUT with the digest); returns the blob's descriptor fields."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    started = session.post(url(f"{PROBE}/blobs/uploads/"), timeout=10)
    assert started.status_code == 202, started.text
    location = requests.compat.urljoin(url(""), started.headers["Location"])
    finished = session.put(location, params={"digest": digest}, data=data, timeout=10,
                           headers={"Content-Type": "application/octet-stream"})
    assert finished.status_code == 201, finished.text
    return {"size": len(data), "digest": digest}


def test_the_account_pushes_and_reads(account):
    session = requests.Session()
    session.auth = account
    tag = f"probe-{uuid.uuid4().hex[:12]}"  # this run's own, so concurrent runs never delete each other's
    config = upload_blob(session, json.dumps({"architecture": "amd64", "os": "linux", "probe": tag}).encode())
    layer = upload_blob(session, tag.encode())
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}]})
    pushed = session.put(url(f"{PROBE}/manifests/{tag}"), data=manifest, timeout=10,
                         headers={"Content-Type": OCI_MANIFEST})
    assert pushed.status_code == 201, pushed.text
    digest = pushed.headers["Docker-Content-Digest"]
    try:
        read = session.get(url(f"{PROBE}/manifests/{tag}"), headers={"Accept": OCI_MANIFEST}, timeout=10)
        assert read.status_code == 200 and read.headers["Docker-Content-Digest"] == digest
        assert PROBE in session.get(url("_catalog"), params={"n": 1000}, timeout=10).json()["repositories"]
        trusted = session.head(url(f"{TRUSTED}/manifests/latest"), timeout=10, headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json"})
        assert trusted.status_code == 200, f"{TRUSTED}:latest is missing; run scripts/setup.sh, which pushes it"
        assert_refused(requests.get(url(f"{PROBE}/manifests/{tag}"), headers={"Accept": OCI_MANIFEST}, timeout=10))
    finally:
        assert session.delete(url(f"{PROBE}/manifests/{digest}"), timeout=10).status_code == 202


def base64_start(prefix):
    """What the base64 form of any text starting with prefix starts with (whole 3-byte groups only)."""
    return base64.b64encode(prefix[:len(prefix) // 3 * 3].encode()).decode()


def test_an_algorithm_container_has_no_trace_of_the_account(account):
    user, password = account
    secrets = {password, base64.b64encode(f"{user}:{password}".encode()).decode()}
    _, file_password = local_credentials()
    secrets.add(file_password)
    markers = [user, base64_start(f"{user}:")]
    engine = docker.from_env()
    limits = ContainerLimits(**CONTAINER_DEFAULTS)
    assert (limits.network, limits.user) == ("none", "65534:65534")  # the runner's defaults, as sites have them
    container = containers.create_contained(engine, BASE_IMAGE, [], {}, limits, {}, limits.network,
                                            ["python3", "-c", LOOK_FOR_THE_ACCOUNT, *markers])
    try:
        container.start()
        assert container.wait(timeout=120)["StatusCode"] == 0, container.logs().decode()
        output = container.logs(stdout=True, stderr=False).decode()
        container.reload()
        for where in (output, json.dumps(container.attrs)):
            assert not any(secret in where for secret in secrets)
        seen = json.loads(output)
        assert user not in json.dumps(seen["environment"])
        assert seen["holding"] == []
        assert container.attrs["Mounts"] == []
        # Read from the host's side, so the unprivileged user's view of /root does not hide anything.
        for path in ("/root/.docker", str(REGISTRY_CREDENTIALS.parent)):
            with pytest.raises(docker.errors.NotFound):
                container.get_archive(path)
    finally:
        containers.remove(engine, container.id)
