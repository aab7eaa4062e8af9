"""The site's configuration file (config.json): every field, its default, and its validation.

The runner refuses to start on any bad field, with one line per problem naming
the field and the fix. Keys starting with "//" are comments. The field names of
the original PyTaskManager config are accepted as aliases. docs/site-config.md
explains each field to the IT officer.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ALIASES = {"masterUrl": "registry_url", "endpointUrl": "sparql_endpoint"}

CONTAINER_DEFAULTS = {
    "network": "none",
    "memory": "2g",
    "cpus": 1.0,
    "pids": 256,
    "timeout_seconds": 3600,
    "max_output_bytes": 1024 ** 3,
    "user": "65534:65534",
}


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
    user: str


@dataclass(frozen=True)
class SiteConfig:
    registry_url: str
    site_token: str
    sparql_endpoint: str
    whitelist: tuple
    require_digest: bool
    work_dir: Path
    long_poll_seconds: int
    container: ContainerLimits


def load_site_config(path):
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(path, ["file not found; copy config.json from the repository and adapt it"]) from None
    except json.JSONDecodeError as error:
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
        fields[ALIASES.get(key, key)] = value

    def take(name, kind, default=None, required=False):
        if name not in fields:
            if required:
                problems.append(f"{name} is missing")
            return default
        value = fields.pop(name)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            problems.append(f"{name} must be a {expected}, not {json.dumps(value)}")
            return default
        return value

    registry_url = take("registry_url", str, required=True)
    if registry_url and not re.match(r"^https?://[^/\s]+", registry_url):
        problems.append(f"registry_url {registry_url!r} must start with http:// or https://")
    token = _site_token(take("site_token", str), take("site_token_env", str), problems)
    sparql_endpoint = take("sparql_endpoint", str, required=True)
    whitelist = []
    for index, pattern in enumerate(take("whitelist", list, [], required=True)):
        try:
            whitelist.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            problems.append(f"whitelist[{index}] is not a valid regular expression: {error}")
    if "whitelist" in raw and not raw["whitelist"]:
        problems.append("whitelist is empty, so this site would refuse every task; add a pattern")
    require_digest = take("require_digest", bool, False)
    work_dir = Path(take("work_dir", str, "site-work"))
    long_poll_seconds = take("long_poll_seconds", int, 30)
    if not 1 <= long_poll_seconds <= 120:
        problems.append("long_poll_seconds must be between 1 and 120")
    container = _container_limits(take("container", dict, {}), problems)
    for unknown in sorted(fields):
        problems.append(f"unknown field {unknown!r}; see docs/site-config.md for the fields a site config has")
    if problems:
        raise ConfigError(source, problems)
    return SiteConfig(
        registry_url=registry_url.rstrip("/"), site_token=token, sparql_endpoint=sparql_endpoint,
        whitelist=tuple(whitelist), require_digest=require_digest,
        work_dir=work_dir if work_dir.is_absolute() else (Path(base_dir) / work_dir).resolve(),
        long_poll_seconds=long_poll_seconds, container=container)


def _site_token(token, token_env, problems):
    if token and token_env:
        problems.append("give site_token or site_token_env, not both")
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            problems.append(f"site_token_env names {token_env}, but that environment variable is not set")
    elif not token:
        problems.append("site_token is missing: set it, or name an environment variable in site_token_env")
    return token


def _container_limits(given, problems):
    values = dict(CONTAINER_DEFAULTS)
    for key, value in given.items():
        if key.startswith("//"):
            continue
        if key not in CONTAINER_DEFAULTS:
            problems.append(f"container.{key} is not a container setting; known: {', '.join(CONTAINER_DEFAULTS)}")
            continue
        expected = type(CONTAINER_DEFAULTS[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or isinstance(value, bool):
            problems.append(f"container.{key} must be a {expected.__name__}, not {json.dumps(value)}")
            continue
        values[key] = value
    if not re.fullmatch(r"[0-9]+[bkmg]?", str(values["memory"]).lower()):
        problems.append(f"container.memory {values['memory']!r} must look like 512m or 2g")
    for key in ("cpus", "pids", "timeout_seconds", "max_output_bytes"):
        if values[key] <= 0:
            problems.append(f"container.{key} must be greater than 0")
    return ContainerLimits(**values)
