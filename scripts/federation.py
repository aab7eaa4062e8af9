"""A whole federation on this machine: the registry, and per site a SPARQL endpoint with its
own synthetic cohort and a site runner, each a real process on loopback.

Used by the demo and by the tests. Everything started here is stopped by stop()
(or by leaving the `with` block); infrastructure shared across runs (the Docker
engine, the image registry) is started by scripts/setup.sh instead.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
from client import disk_limits  # noqa: E402
from data.generate_cohort import generate_cohort, write_ntriples  # noqa: E402
from researcher import Registry  # noqa: E402
from scripts.balancer import Balancer  # noqa: E402

PYTHON = sys.executable
OXIGRAPH = str(Path(sys.executable).parent / "oxigraph")
IMAGE_REGISTRY = os.environ.get("PHT_IMAGE_REGISTRY", "127.0.0.1:5050")
# One path segment under pht/, with a tag or a digest: the over-broad warning's own advice (client/image_policy.py).
DEFAULT_WHITELIST = [IMAGE_REGISTRY.replace(".", r"\.") + r"/pht/[a-z0-9-]+(:[A-Za-z0-9_.-]+)?(@sha256:[0-9a-f]{64})?"]
# The registry's operator commands a federation's start runs side by side (one per site, and the researcher's).
ADMIN_COMMANDS_AT_ONCE = 4


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answers(url, process, what, timeout=30, ca_bundle=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering at {url}")
        try:
            requests.get(url, timeout=1, verify=str(ca_bundle) if ca_bundle else None)
            return
        except requests.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout} s")


def register_directly(database_url, role, names):
    """Tokens for many sites or researchers at once, written straight into the registry's database:
    for tests and benchmarks, where hundreds of create-site commands would only take time."""
    import sqlalchemy as sa

    from master import auth, store

    engine = sa.create_engine(database_url)
    tokens = {}
    for name in names:
        tokens[name] = auth.new_token()
        store.create_principal(engine, role, name, auth.hash_token(tokens[name]))
    engine.dispose()
    return tokens


@dataclass
class Site:
    name: str
    token: str
    patients: list
    sparql_endpoint: str
    config_path: Path
    runner: subprocess.Popen | None = None


@dataclass
class LocalFederation:
    site_names: tuple = ("hospital-a", "hospital-b")
    patients_per_site: int = 50
    seed: int = 2026
    lease_seconds: int = 60
    whitelist: list = field(default_factory=lambda: list(DEFAULT_WHITELIST))
    start_runners: bool = True
    # none: algorithms reach their site's SPARQL endpoint only through the runner's per-run gateway.
    container_network: str = "none"
    # Serve each site's store read-write (oxigraph serve), so a test can show the gateway refused an update.
    writable_sparql: bool = False
    # Extra site config fields for every site; "container" entries are merged into the container limits.
    site_settings: dict = field(default_factory=dict)
    folder: Path | None = None
    # {"cert", "key", "ca"}: PEM files; the registry then serves HTTPS, and sites and researcher verify it.
    tls: dict | None = None
    # More than one: registry replicas behind HAProxy (scripts/balancer.py), each with its own data folder, on
    # database_url (PostgreSQL) and result_store (s3://…, with s3_endpoint_url and AWS_* in the environment).
    replicas: int = 1
    database_url: str = ""  # empty: SQLite in the registry's data folder
    result_store: str = ""
    s3_endpoint_url: str = ""

    def __post_init__(self):
        self._processes = []
        self._own_folder = self.folder is None
        self.folder = Path(self.folder or tempfile.mkdtemp(prefix="pht-federation-"))
        self.sites = {}

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        if self.replicas > 1 and not self.database_url.startswith("postgresql"):
            raise ValueError("replicas share one database: give database_url (PostgreSQL)")
        self.registry_data = self.folder / "registry"
        self.registry_ports = [free_port() for _ in range(self.replicas)]
        self.registry_processes = [None] * self.replicas
        scheme = "https" if self.tls else "http"
        for replica in range(self.replicas):
            self.start_registry(replica)
        if self.replicas > 1:
            self.balancer = Balancer(self.folder / "balancer", f"127.0.0.1:{free_port()}",
                                     [f"127.0.0.1:{port}" for port in self.registry_ports], check_seconds=0.5)
            self.balancer.start()
            self._processes.append(self.balancer.process)
            self.registry_url = self.balancer.url
            wait_until_answers(self.registry_url + "/health", self.balancer.process, "the balancer")
        else:
            self.registry_url = f"{scheme}://127.0.0.1:{self.registry_ports[0]}"
        # Each command is a process start of most of a second, its imports: side by side, and while the sites'
        # SPARQL endpoints start.
        with concurrent.futures.ThreadPoolExecutor(ADMIN_COMMANDS_AT_ONCE) as pool:
            researcher = pool.submit(self.admin, "create-researcher", "researcher")
            registering = {name: pool.submit(self.admin, "create-site", name) for name in self.site_names}
            for index, name in enumerate(self.site_names):
                self.sites[name] = self._start_site(name, self.seed + index, registering[name])
            self.researcher_token = researcher.result()
        if self.start_runners:
            for name in self.site_names:
                self.start_runner(name)

    def start_registry(self, replica=0):
        """Start a registry process (replica: which); again after stop_registry(), on the same port and data."""
        port = self.registry_ports[replica]
        data = self.registry_data if replica == 0 else self.folder / f"registry-{replica}"
        store = ["--result-store", self.result_store, "--s3-endpoint-url", self.s3_endpoint_url] if self.result_store else []
        tls = ["--tls-cert", str(self.tls["cert"]), "--tls-key", str(self.tls["key"])] if self.tls else []
        self.registry_processes[replica] = self._spawn(
            "registry" if replica == 0 else f"registry-{replica}",
            [PYTHON, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(data), "--database-url", self.database_url,
             "serve", "--host", "127.0.0.1", "--port", str(port), "--lease-seconds", str(self.lease_seconds),
             *store, *tls])
        wait_until_answers(f"{'https' if self.tls else 'http'}://127.0.0.1:{port}/health",
                           self.registry_processes[replica], "the registry", ca_bundle=self.ca_bundle)

    @property
    def registry_process(self):
        return self.registry_processes[0]

    @property
    def registry_port(self):
        """The port sites reach the registry on: the balancer's, with replicas."""
        return int(self.registry_url.rsplit(":", 1)[1])

    @property
    def ca_bundle(self):
        return self.tls["ca"] if self.tls else None

    def stop_registry(self, replica=0, how=signal.SIGTERM):
        """Stop a registry process (as an outage would; SIGKILL as a crash); start_registry() brings it back."""
        self.registry_processes[replica].send_signal(how)
        self.registry_processes[replica].wait(timeout=15)

    def admin(self, *command):
        """Run one of the registry's operator commands; returns what it printed."""
        done = subprocess.run(
            [PYTHON, str(ROOT / "master" / "TaskMaster.py"), "--data-dir", str(self.registry_data),
             "--database-url", self.database_url, *command], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    def researcher(self):
        return Registry(self.registry_url, self.researcher_token, ca_bundle=self.ca_bundle)

    def _start_site(self, name, seed, registering):
        """registering: the site's create-site command (a future of its token)."""
        folder = self.folder / name
        store = folder / "oxigraph"
        patients = generate_cohort(name, self.patients_per_site, seed)
        cohort_file = folder / "cohort.nt"
        folder.mkdir(parents=True)
        write_ntriples(patients, name, cohort_file)
        subprocess.run([OXIGRAPH, "load", "--location", str(store), "--file", str(cohort_file)],
                       check=True, capture_output=True)
        port = free_port()
        serve = "serve" if self.writable_sparql else "serve-read-only"
        endpoint_process = self._spawn(
            f"{name}-sparql", [OXIGRAPH, serve, "--location", str(store), "--bind", f"127.0.0.1:{port}"])
        sparql_endpoint = f"http://127.0.0.1:{port}/query"
        wait_until_answers(f"http://127.0.0.1:{port}/", endpoint_process, f"{name}'s SPARQL endpoint")
        config_path = folder / "config.json"
        token = registering.result()
        extra = dict(self.site_settings)
        config = {
            "registry_url": self.registry_url,
            "site_name": name,
            "site_token": token,
            "sparql_endpoint": sparql_endpoint,
            "whitelist": self.whitelist,
            "work_dir": str(folder / "work"),
            "long_poll_seconds": 10,
            "container": {"network": self.container_network, "timeout_seconds": 300, **extra.pop("container", {})},
            **({"allow_host_network": True} if self.container_network == "host" else {}),
            **({"ca_bundle": str(self.ca_bundle)} if self.tls else {}),
            **extra,
        }
        config_path.write_text(json.dumps(config, indent=2))
        return Site(name, token, patients, sparql_endpoint, config_path)

    def start_runner(self, name, *extra_args):
        site = self.sites[name]
        site.runner = self._spawn(f"{name}-runner", [PYTHON, str(ROOT / "client" / "runScript.py"),
                                                     "--config", str(site.config_path), *extra_args])
        return site.runner

    def configure_site(self, name, **changes):
        """Change fields of a site's config.json (container fields merge); takes effect at the runner's next start."""
        config_path = self.sites[name].config_path
        config = json.loads(config_path.read_text())
        config["container"].update(changes.pop("container", {}))
        config.update(changes)
        config_path.write_text(json.dumps(config, indent=2))
        return config

    def stop_runner(self, name, how=signal.SIGTERM, timeout=60):
        """Signal a site's runner and wait for it to exit; returns its exit code."""
        runner = self.sites[name].runner
        runner.send_signal(how)
        return runner.wait(timeout=timeout)

    def log_of(self, what):
        return (self.folder / "logs" / f"{what}.log").read_text(errors="replace")

    def _spawn(self, what, command):
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = open(logs / f"{what}.log", "ab")
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        log_file.close()
        self._processes.append(process)
        return process

    def stop(self):
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._processes.clear()
        if self._own_folder:
            disk_limits.release_all_under(self.folder)  # the runners' per-run and per-session filesystems
            shutil.rmtree(self.folder, ignore_errors=True)
