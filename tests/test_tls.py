"""HTTPS end to end: the registry and the FileService serve it with a certificate of a consortium's private CA
(made here with openssl), and the researcher's library and CLI and the site runner's client verify it, with
the CA's bundle given, and refuse a server that cannot prove who it is.
"""

import json
import socket
import subprocess
import sys

import pytest
import requests
from click.testing import CliRunner

from client.registry_client import RegistryClient
from common.transport import plain_http_warning
from master import store
from researcher import Registry, RegistryError
from researcher.__main__ import cli as researcher_cli
from scripts.federation import IMAGE_REGISTRY, LocalFederation, free_port, register_directly, wait_until_answers
from scripts.processes import stop_process
from tests.conftest import ROOT
from tests.test_registry_server import RegistryProcess

GIVE_UP_SECONDS = 30
PATIENT_COUNT = f"{IMAGE_REGISTRY}/pht/patient-count:latest"


def openssl(*arguments, folder):
    subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """{"ca": the CA's certificate, "cert" and "key": the server's for IP 127.0.0.1, "other_ca": a CA that
    signed nothing here}"""
    folder = tmp_path_factory.mktemp("tls")
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", *curve, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=PHT test {ca}", "-addext", "keyUsage=critical,keyCertSign,cRLSign", folder=folder)
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", folder=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                                       "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext", folder=folder)
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key",
            "other_ca": folder / "other-ca.pem"}


@pytest.fixture
def https_registry(tmp_path, certificates):
    """A registry serving HTTPS (SQLite): (its https:// URL, a researcher's token, a site's token, its log)."""
    database_url = f"sqlite:///{tmp_path / 'data' / 'registry.sqlite'}"
    registry = RegistryProcess(tmp_path / "data", database_url, tmp_path / "registry.log", "--header-seconds", "1",
                               tls={"cert": certificates["cert"], "key": certificates["key"], "ca": certificates["ca"]})
    try:
        researcher = register_directly(database_url, store.RESEARCHER, ["alice"])["alice"]
        site = register_directly(database_url, store.SITE, ["hospital-a"])["hospital-a"]
        yield registry.url, researcher, site, registry.log_path
    finally:
        registry.stop()


def test_the_researcher_library_verifies_the_registry_with_the_consortium_ca(https_registry, certificates):
    url, researcher, _, _ = https_registry
    assert Registry(url, researcher, ca_bundle=certificates["ca"]).sites()[0]["name"] == "hospital-a"
    for ca_bundle in (None, certificates["other_ca"]):  # the system's CAs, or another CA: not this registry's
        with pytest.raises(RegistryError, match="did not prove who it is.*ca_bundle in the config file or PHT_CA"):
            Registry(url, researcher, ca_bundle=ca_bundle).sites()


def test_the_researcher_cli_takes_the_ca_bundle_from_the_environment(https_registry, certificates, tmp_path):
    url, researcher, _, _ = https_registry
    environment = {"PHT_REGISTRY_URL": url, "PHT_TOKEN": researcher, "PHT_CONFIG": str(tmp_path / "none.toml")}
    done = CliRunner().invoke(researcher_cli, ["sites"], env={**environment, "PHT_CA_BUNDLE": str(certificates["ca"])})
    assert done.exit_code == 0 and "hospital-a" in done.output, done.output
    refused = CliRunner().invoke(researcher_cli, ["sites"], env=environment)
    assert refused.exit_code == 1 and "did not prove who it is" in refused.output


def test_the_site_runners_client_verifies_the_registry(https_registry, certificates):
    url, _, site, _ = https_registry
    assert RegistryClient(url, site, ca_bundle=certificates["ca"]).site_name() == "hospital-a"
    with pytest.raises(requests.exceptions.SSLError):
        RegistryClient(url, site, ca_bundle=certificates["other_ca"]).site_name()


def test_a_runner_whose_registry_cannot_prove_who_it_is_stops_with_the_fix(https_registry, certificates, tmp_path):
    url, _, site, _ = https_registry
    config = tmp_path / "site.json"
    config.write_text(json.dumps({
        "registry_url": url, "site_name": "hospital-a", "site_token": site, "sparql_endpoint": "http://127.0.0.1:1",
        "whitelist": [r"127\.0\.0\.1:5050/pht/.*"], "work_dir": str(tmp_path / "work"),
        "ca_bundle": str(certificates["other_ca"])}))
    done = subprocess.run([sys.executable, str(ROOT / "client" / "runScript.py"), "--config", str(config), "--once"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "did not prove who it is" in done.stderr and "set ca_bundle to that CA's PEM file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_stalled_or_plain_http_handshake_is_closed_and_the_server_goes_on(https_registry, certificates):
    url, researcher, _, log = https_registry
    port = int(url.rsplit(":", 1)[1])
    stalled = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_SECONDS)
    stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
    assert stalled.recv(100) == b""  # closed at the header deadline (1 s here)
    plain = socket.create_connection(("127.0.0.1", port), timeout=GIVE_UP_SECONDS)
    plain.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert not plain.recv(100).startswith(b"HTTP/")  # an alert at most, and the close: no answer in plain HTTP
    except ConnectionResetError:
        pass
    assert Registry(url, researcher, ca_bundle=certificates["ca"]).sites()
    assert "TLS handshake not done within 1 s (--header-seconds)" in log.read_text()


def test_a_federated_round_over_https(certificates):
    """The registry on HTTPS with the consortium's certificate, a real site runner and the researcher's library
    verifying it: a task runs at the site and its result comes back."""
    tls = {"cert": certificates["cert"], "key": certificates["key"], "ca": certificates["ca"]}
    with LocalFederation(site_names=("hospital-a",), patients_per_site=7, tls=tls) as federation:
        researcher = federation.researcher()
        task = researcher.submit(PATIENT_COUNT, {"label": "over https"})
        [result] = researcher.wait_for_results(task["id"], timeout_seconds=120)
        assert result.output == {"patient_count": 7, "label": "over https"}
        assert "plain HTTP" not in federation.log_of("hospital-a-runner")


def test_the_fileservice_serves_https(tmp_path, certificates):
    port = free_port()
    with open(tmp_path / "fileservice.log", "ab") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "fileservice" / "FileService.py"), "--data-dir",
                                    str(tmp_path / "ttp"), "serve", "--host", "127.0.0.1", "--port", str(port),
                                    "--tls-cert", str(certificates["cert"]), "--tls-key", str(certificates["key"])],
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_answers(f"https://127.0.0.1:{port}/health", process, "the FileService",
                           ca_bundle=certificates["ca"])
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/health", verify=str(certificates["other_ca"]), timeout=10)
    finally:
        stop_process(process)


def test_serve_wants_the_certificate_and_its_key_together(tmp_path, certificates):
    done = subprocess.run([sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(tmp_path),
                           "serve", "--port", "1", "--tls-cert", str(certificates["cert"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give --tls-cert and --tls-key together" in done.stderr
    done = subprocess.run([sys.executable, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(tmp_path),
                           "serve", "--port", "1", "--tls-cert", str(certificates["cert"]),
                           "--tls-key", str(certificates["ca"])], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "do not load as a certificate and its key" in done.stderr


@pytest.mark.parametrize("url, warned", [
    ("http://registry.example.org", True), ("http://10.1.2.3:5000", True), ("https://registry.example.org", False),
    ("http://127.0.0.1:5000", False), ("http://localhost:5000", False), ("http://[::1]:5000", False),
])
def test_plain_http_is_warned_of_unless_it_stays_on_this_machine(url, warned):
    assert (plain_http_warning(url) is not None) == warned
