"""Where the registry's URL and the researcher's token come from, so neither has to be typed on a
command line (where the token would end up in the shell's history and in `ps`).

First the environment (PHT_REGISTRY_URL, PHT_TOKEN, PHT_IDENTITY, PHT_CA_BUNDLE), then a TOML file, by default
~/.config/pht/researcher.toml (another with PHT_CONFIG):

    registry_url = "https://registry.example.org"
    token = "..."
    identity_file = "~/.config/pht/identity.txt"   # optional: opens the results of encrypted tasks
    ca_bundle = "~/.config/pht/consortium-ca.pem"   # optional: the private CA that signs the registry's certificate
"""

import os
import tomllib
from pathlib import Path

from researcher.client import Registry

URL_VARIABLE = "PHT_REGISTRY_URL"
TOKEN_VARIABLE = "PHT_TOKEN"
IDENTITY_VARIABLE = "PHT_IDENTITY"
CA_BUNDLE_VARIABLE = "PHT_CA_BUNDLE"
CONFIG_VARIABLE = "PHT_CONFIG"
DEFAULT_CONFIG_FILE = Path("~/.config/pht/researcher.toml")


class SettingsError(Exception):
    """The URL or token is missing or unreadable; the message says where to put it."""


def connect(registry_url=None, config_file=None):
    """A Registry from the environment or the config file; registry_url, when given, wins over both."""
    config_file = Path(config_file or os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG_FILE).expanduser()
    from_file = _read_config_file(config_file)
    url = registry_url or os.environ.get(URL_VARIABLE) or from_file.get("registry_url")
    token = os.environ.get(TOKEN_VARIABLE) or from_file.get("token")
    if not url:
        raise SettingsError(f"no registry URL: set {URL_VARIABLE} or put registry_url = \"...\" in {config_file}")
    if not token:
        raise SettingsError(f"no researcher token: set {TOKEN_VARIABLE} or put token = \"...\" in {config_file} "
                            "(the registry's operator issues it with create-researcher)")
    identity_file = os.environ.get(IDENTITY_VARIABLE) or from_file.get("identity_file")
    ca_bundle = os.environ.get(CA_BUNDLE_VARIABLE) or from_file.get("ca_bundle")
    if ca_bundle and not Path(ca_bundle).expanduser().is_file():
        raise SettingsError(f"the CA bundle {ca_bundle} is not a file; give the PEM file of the CA that signs the "
                            f"registry's certificate ({CA_BUNDLE_VARIABLE}, or ca_bundle in {config_file})")
    return Registry(url, token, identity_file=identity_file,
                    ca_bundle=Path(ca_bundle).expanduser() if ca_bundle else None)


def _read_config_file(path):
    if not path.exists():
        return {}
    try:
        settings = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"{path}: cannot read it as TOML: {error}") from None
    unknown = set(settings) - {"registry_url", "token", "identity_file", "ca_bundle"}
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; "
                            "only registry_url, token, identity_file and ca_bundle are read")
    return settings
