"""The site's configuration file (config.json): every field, its default, and its validation.

Pure: reading the file is the only I/O here (runScript.py checks the config against
this machine's Docker engine and folders); ConfigSource reads it again when it changed, for the
fields a running runner takes up (RELOADABLE). The runner refuses to start on any bad
field, with one line per problem naming the field and the fix. Keys starting with
"//" are comments. docs/site-config.md explains each field to the IT officer.
"""

import dataclasses
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from client import approvals, deliveries, encryption
from client.airlock_checks import AirlockChecks
from common import names

# Field names of the original PyTaskManager's config.json that mean the same here.
ALIASES = {
    "masterUrl": "registry_url",
    "endpointUrl": "sparql_endpoint",
    "endpointType": "endpoint_type",
    "endpointToken": "endpoint_token",
    "interval": "poll_interval_seconds",
}

# Fields of the original config that have no counterpart: say what replaced them.
RETIRED = {
    "id": "sites are identified by their token now (site_token)",
    "name": "the site's name is site_name, as the registry's operator registered it (create-site NAME)",
    "institute": "the registry's operator keeps who a site is (create-site)",
    "country": "the registry's operator keeps who a site is (create-site)",
    "email": "the registry's operator keeps who a site is (create-site)",
    "dockerHost": "algorithms reach the SPARQL endpoint through the site's SPARQL gateway (sparql_gateway)",
}

CONTAINER_DEFAULTS = {
    "network": "none",
    "memory": "2g",
    "cpus": 1.0,
    "pids": 256,
    "timeout_seconds": 3600,
    "max_output_bytes": 1024 ** 3,
    "max_output_files": 100_000,
    "max_temp_bytes": 1024 ** 3,
    "max_temp_files": 100_000,
    "disk_limits": "filesystem",
    "user": "65534:65534",
}

# How /output and /temp are held to their limits (disk_limits.py): a filesystem of fixed size each,
# or the output's size checked every few seconds and /temp unlimited.
DISK_LIMITS = ("filesystem", "polling")
MINIMUM_DISK_BYTES = 1024 ** 2  # ext4 needs room for its own bookkeeping

SPARQL_GATEWAY_DEFAULTS = {
    "query_timeout_seconds": 300,
    "max_response_bytes": 1024 ** 3,
    "max_queries": 10000,
    "max_query_bytes": 100_000,
    "record_query_text": True,
    "relay_base_image": "pht-base:bookworm",
}

MEMORY_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
URL_HOST_RULE = ", then a host name or address (and a port number, if any)"  # what a URL in the config needs
DOCKER_MINIMUM_MEMORY = 6 * 1024 ** 2


log = logging.getLogger("pht.runner")


class ConfigError(Exception):
    """Every problem found in the config, one per line."""

    def __init__(self, source, problems):
        self.problems = [f"{source}: {p}" for p in problems]
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ContainerLimits:
    network: str
    memory: str
    cpus: float
    pids: int
    timeout_seconds: int
    max_output_bytes: int
    max_output_files: int
    max_temp_bytes: int
    max_temp_files: int
    disk_limits: str
    user: str


@dataclass(frozen=True)
class SparqlGatewaySettings:
    """Per-run limits of the SPARQL gateway (sparql_gateway.py), and the image its relay is built on."""
    query_timeout_seconds: int
    max_response_bytes: int
    max_queries: int
    max_query_bytes: int
    record_query_text: bool
    relay_base_image: str


@dataclass(frozen=True)
class SiteConfig:
    registry_url: str
    ca_bundle: Path | None  # the private CA that signs the registry's and recipients' certificates; None: the system's
    site_name: str
    site_token: str
    sparql_endpoint: str
    endpoint_type: str
    endpoint_token: str
    whitelist: tuple
    require_digest: bool
    work_dir: Path
    image_import_folder: Path | None
    max_concurrent_runs: int
    max_input_bytes: int
    long_poll_seconds: int
    poll_interval_seconds: float  # 5, or as given: at least 0.1
    session_idle_seconds: int
    max_sessions: int
    container: ContainerLimits
    allow_host_network: bool
    sparql_gateway: SparqlGatewaySettings
    recipients: dict  # name -> deliveries.Recipient: third parties this site may send files to
    researcher_keys: dict | None  # researcher name -> tuple of pinned age keys; None: keys are not pinned
    approval_policy: str  # approvals.POLICIES: whether runs wait for the site's IT officer before they run
    airlock: "Airlock"


@dataclass(frozen=True)
class Airlock:
    """What happens to a run's results before they leave: automatic checks, and a person's review if asked."""
    review: bool  # held until the IT officer releases them (runScript.py outputs ...)
    checks: AirlockChecks


# The fields a running runner takes up again when its config file changes (or on SIGHUP); the others need
# a restart.
RELOADABLE = ("whitelist", "require_digest", "approval_policy", "airlock")


class ConfigSource:
    """The config file, read again when it changed: the reloadable fields of a config that passes every check
    at start, or None (each problem logged) when it does not."""

    def __init__(self, path):
        self.path = Path(path)
        self.seen = self._stamp()

    def _stamp(self):
        try:
            status = self.path.stat()
        except OSError:
            return None
        return status.st_mtime_ns, status.st_size

    def changed(self):
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True

    def reload(self, current):
        try:
            fresh = load_site_config(self.path)
        except ConfigError as error:
            for problem in error.problems:
                log.error("%s", problem)
            log.error("the changed config is not taken up; the runner goes on as it was configured")
            return None
        others = [field.name for field in dataclasses.fields(fresh)
                  if field.name not in RELOADABLE and getattr(fresh, field.name) != getattr(current, field.name)]
        if others:
            log.warning("config fields %s changed: they take effect at the runner's next start", ", ".join(others))
        return dataclasses.replace(current, **{name: getattr(fresh, name) for name in RELOADABLE})


def load_site_config(path):
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, ["file not found; copy config.json from the repository and adapt it"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(path, [f"not valid JSON: {error}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(path, ["must be a JSON object of fields"])
    return parse_site_config(raw, source=path, base_dir=path.parent)


def parse_site_config(raw, source="config.json", base_dir=Path(".")):
    problems = []
    fields = {}
    for key, value in raw.items():
        if key.startswith("//"):
            continue
        if key in RETIRED:
            problems.append(f"{key} is a field of the original PyTaskManager config that this runner does not use: "
                            f"{RETIRED[key]}; remove it")
            continue
        name = ALIASES.get(key, key)
        if name in fields:
            problems.append(f"{name} is given twice (once as {key}); keep one")
        fields[name] = value

    def take(name, kind, default=None, required=False, at_least=None, at_most=None):
        if name not in fields:
            if required:
                problems.append(f"{name} is missing")
            return default
        value = given = fields.pop(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            problems.append(f"{name} must be a {kind.__name__}, not {json.dumps(value)}")
            return default
        # Written so that NaN (which json.loads takes) is out of every range.
        if at_least is not None and not value >= at_least or at_most is not None and not value <= at_most:
            problems.append(f"{name} must be between {at_least} and {at_most}, not {json.dumps(given)}")
            return default
        return value

    registry_url = take("registry_url", str, required=True)
    if registry_url and not _is_http_url(registry_url):
        problems.append(f"registry_url {registry_url!r} must start with http:// or https://{URL_HOST_RULE}")
    ca_bundle = take("ca_bundle", str)
    if ca_bundle and not _folder(ca_bundle, base_dir).is_file():
        problems.append(f"ca_bundle {ca_bundle!r} is not a file; give the PEM file of the CA that signs the "
                        "registry's certificate, or leave it out for the system's CAs")
    site_name = take("site_name", str, socket.gethostname())
    if not site_name.strip():
        problems.append("site_name is empty; give the name the registry's operator registered this site under")
    token = _site_token(take("site_token", str), take("site_token_env", str), problems)
    sparql_endpoint = take("sparql_endpoint", str, required=True)
    if sparql_endpoint and not _is_http_url(sparql_endpoint):
        problems.append(f"sparql_endpoint {sparql_endpoint!r} must start with http:// or https://{URL_HOST_RULE}")
    endpoint_type = take("endpoint_type", str, "sparql")
    endpoint_token = take("endpoint_token", str, "")
    whitelist = []
    for index, pattern in enumerate(take("whitelist", list, [], required=True)):
        try:
            whitelist.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            problems.append(f"whitelist[{index}] is not a valid regular expression: {error}")
    if "whitelist" in raw and not raw["whitelist"]:
        problems.append("whitelist is empty, so this site would refuse every task; add a pattern")
    require_digest = take("require_digest", bool, True)
    work_dir = _folder(take("work_dir", str, "site-work"), base_dir)
    import_folder = take("image_import_folder", str)
    max_concurrent_runs = take("max_concurrent_runs", int, 1, at_least=1, at_most=64)
    max_input_bytes = take("max_input_bytes", int, 16 * 1024 ** 2, at_least=1, at_most=2 ** 40)
    # 50 s: an idle site renews its wait as seldom as common 60-s proxy timeouts allow (docs/performance.md §9).
    long_poll_seconds = take("long_poll_seconds", int, 50, at_least=0, at_most=120)
    # A fraction of a second is for tests, which wait on the runner's retries; a site has no use for it.
    poll_interval_seconds = take("poll_interval_seconds", float, 5, at_least=0.1, at_most=3600)
    session_idle_seconds = take("session_idle_seconds", int, 7 * 24 * 3600, at_least=1, at_most=10 * 365 * 24 * 3600)
    max_sessions = take("max_sessions", int, 20, at_least=1, at_most=100_000)
    container = _container_limits(take("container", dict, {}), problems)
    allow_host_network = take("allow_host_network", bool, False)
    if container.network == "host" and not allow_host_network:
        problems.append("container.network host lets algorithms reach everything this machine can (the registry, "
                        "databases, other hosts) and bypass the SPARQL gateway; leave it at none, where algorithms "
                        "reach the data only through the gateway, or set allow_host_network: true to accept that")
    sparql_gateway = _sparql_gateway(take("sparql_gateway", dict, {}), problems)
    recipients = _recipients(take("recipients", dict, {}), problems)
    researcher_keys = _researcher_keys(take("researcher_keys", dict), problems)
    approval_policy = take("approval_policy", str, approvals.WHITELIST)
    if approval_policy not in approvals.POLICIES:
        problems.append(f"approval_policy {approval_policy!r} must be one of {', '.join(approvals.POLICIES)}")
    airlock = _airlock(take("airlock", dict, {}), problems)
    for unknown in sorted(fields):
        problems.append(f"unknown field {unknown!r}; see docs/site-config.md for the fields a site config has")
    if problems:
        raise ConfigError(source, problems)
    return SiteConfig(
        registry_url=registry_url.rstrip("/"), ca_bundle=_folder(ca_bundle, base_dir) if ca_bundle else None,
        site_name=site_name, site_token=token,
        sparql_endpoint=sparql_endpoint, endpoint_type=endpoint_type, endpoint_token=endpoint_token,
        whitelist=tuple(whitelist), require_digest=require_digest, work_dir=work_dir,
        image_import_folder=_folder(import_folder, base_dir) if import_folder else None,
        max_concurrent_runs=max_concurrent_runs, max_input_bytes=max_input_bytes, long_poll_seconds=long_poll_seconds,
        poll_interval_seconds=poll_interval_seconds, session_idle_seconds=session_idle_seconds,
        max_sessions=max_sessions, container=container, allow_host_network=allow_host_network,
        sparql_gateway=sparql_gateway, recipients=recipients, researcher_keys=researcher_keys,
        approval_policy=approval_policy, airlock=airlock)


def memory_bytes(memory):
    """'512m' -> 536870912; None if it is not a size Docker understands."""
    match = re.fullmatch(r"([0-9]+)([bkmg]?)", str(memory).lower())
    return int(match[1]) * MEMORY_UNITS[match[2]] if match else None


def _is_http_url(url):
    """http(s)://host..., in a form urllib takes apart: a lone [ in the host, or a port that is not a number, would
    otherwise stop the runner with a traceback the first time the URL is read."""
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        return False
    try:
        parts = urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        return False


def _folder(value, base_dir):
    folder = Path(value)
    return folder if folder.is_absolute() else (Path(base_dir) / folder).resolve()


def _site_token(token, token_env, problems, field="site_token"):
    if token and token_env:
        problems.append(f"give {field} or {field}_env, not both")
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            problems.append(f"{field}_env names {token_env}, but that environment variable is not set")
    elif not token:
        problems.append(f"{field} is missing: set it, or name an environment variable in {field}_env")
    return token


def _recipients(given, problems):
    """Third parties (a TTP's FileService) this site may send files to, each with its public key
    pinned here, so that neither the registry nor the network can slip in another key."""
    recipients = {}
    for name, fields in given.items():
        if name.startswith("//"):
            continue
        where = f"recipients.{name}"
        if not names.is_file_name(name):
            problems.append(f"{where}: a recipient's name may have {names.FILE_NAME_RULE}")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{where} must be an object with url, public_key and token (or token_env)")
            continue
        unknown = set(fields) - {"url", "public_key", "token", "token_env"}
        if unknown:
            problems.append(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                            "a recipient has url, public_key and token (or token_env)")
        url, public_key = fields.get("url"), fields.get("public_key")
        if not _is_http_url(url):
            problems.append(f"{where}.url must be the recipient's FileService, starting with http:// or https://"
                            f"{URL_HOST_RULE}")
        try:
            encryption.parse_public_key(public_key if isinstance(public_key, str) else "")
        except ValueError as error:
            problems.append(f"{where}.public_key: {error}; ask the recipient for `FileService.py public-key`")
        token = _site_token(fields.get("token"), fields.get("token_env"), problems, f"{where}.token")
        recipients[name] = deliveries.Recipient(name, url, public_key, token)
    return recipients


def _section(given, defaults, section, problems):
    """The section's settings over its defaults, each of its default's type."""
    values = dict(defaults)
    for key, value in given.items():
        if key.startswith("//"):
            continue
        if key not in defaults:
            problems.append(f"{section}.{key} is not a {section} setting; known: {', '.join(defaults)}")
            continue
        expected = type(defaults[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            problems.append(f"{section}.{key} must be a {expected.__name__}, not {json.dumps(value)}")
            continue
        values[key] = value
    return values


def _sparql_gateway(given, problems):
    values = _section(given, SPARQL_GATEWAY_DEFAULTS, "sparql_gateway", problems)
    for key, default in SPARQL_GATEWAY_DEFAULTS.items():
        if type(default) is int and values[key] <= 0:
            problems.append(f"sparql_gateway.{key} must be greater than 0")
    if not values["relay_base_image"].strip():
        problems.append("sparql_gateway.relay_base_image is empty; name a local image with python3, "
                        "such as pht-base:bookworm (scripts/images.py builds it) or python:3.12-slim")
    return SparqlGatewaySettings(**values)


def _researcher_keys(given, problems):
    """Researcher name -> the age keys this site encrypts their results to; None when not given (no pinning)."""
    if given is None:
        return None
    pinned = {}
    for name, keys in given.items():
        if name.startswith("//"):
            continue
        keys = [keys] if isinstance(keys, str) else keys
        if not isinstance(keys, list) or not keys:
            problems.append(f"researcher_keys.{name} must be an age public key or a list of them")
            continue
        for key in keys:
            try:
                encryption.parse_public_key(key if isinstance(key, str) else "")
            except ValueError as error:
                problems.append(f"researcher_keys.{name}: {error}; ask the researcher for the public key "
                                "`python -m researcher keygen` printed")
        pinned[name] = tuple(keys)
    return pinned


AIRLOCK_FIELDS = ("review", "max_file_bytes", "allowed_suffixes", "check_command", "check_timeout_seconds")


def _airlock(given, problems):
    unknown = sorted(key for key in given if key not in AIRLOCK_FIELDS and not key.startswith("//"))
    if unknown:
        problems.append(f"airlock: unknown field(s) {', '.join(unknown)}; known: {', '.join(AIRLOCK_FIELDS)}")
    review = given.get("review", False)
    if not isinstance(review, bool):
        problems.append(f"airlock.review must be true or false, not {json.dumps(review)}")
        review = False
    # AirlockChecks says what is wrong with a value; JSON gives lists where it takes tuples.
    settings = {key: tuple(given[key]) if isinstance(given[key], list) else given[key]
                for key in AIRLOCK_FIELDS[1:] if key in given}
    for key in ("allowed_suffixes", "check_command"):
        if key in settings and not isinstance(settings[key], tuple):
            problems.append(f"airlock.{key} must be a list of strings")
            settings.pop(key)
    try:
        checks = AirlockChecks(**settings)
    except ValueError as error:
        problems.append(str(error))
        checks = AirlockChecks()
    return Airlock(review, checks)


def _container_limits(given, problems):
    values = _section(given, CONTAINER_DEFAULTS, "container", problems)
    memory = memory_bytes(values["memory"])
    if memory is None:
        problems.append(f"container.memory {values['memory']!r} must look like 512m or 2g")
    elif memory < DOCKER_MINIMUM_MEMORY:
        problems.append(f"container.memory {values['memory']!r} is below Docker's minimum of 6m")
    for key in ("cpus", "pids", "timeout_seconds", "max_output_files", "max_temp_files"):
        if values[key] <= 0:
            problems.append(f"container.{key} must be greater than 0")
    for key in ("max_output_bytes", "max_temp_bytes"):
        if values[key] < MINIMUM_DISK_BYTES:
            problems.append(f"container.{key} must be at least {MINIMUM_DISK_BYTES} (1 MiB)")
    if values["disk_limits"] not in DISK_LIMITS:
        problems.append(f"container.disk_limits {values['disk_limits']!r} must be filesystem (a filesystem of fixed "
                        "size per run and per session; needs root) or polling (output checked every 2 s, /temp "
                        "not limited)")
    if not values["network"].strip():
        problems.append("container.network is empty; use none (the default), host, or a Docker network's name")
    if values["user"].split(":")[0] in ("", "0", "root"):
        problems.append(f"container.user {values['user']!r} would run algorithms as root; "
                        "use an unprivileged uid:gid such as 65534:65534")
    return ContainerLimits(**values)
