"""Where the registry's URL and the researcher's token come from, so neither has to be typed on a
command line (where the token would end up in the shell's history and in `ps`).

First the environment (PHT_REGISTRY_URL, PHT_TOKEN, PHT_IDENTITY, PHT_CA_BUNDLE), then a TOML file, by default
~/.config/pht/researcher.toml (another with PHT_CONFIG):

    registry_url = "https://registry.example.org"
    token = "..."
    identity_file = "~/.config/pht/identity.txt"   # optional: opens the results of encrypted tasks
    ca_bundle = "~/.config/pht/consortium-ca.pem"   # optional: the private CA that signs the registry's certificate

`keygen --save-to-config` writes identity_file into that file (`record_identity_file`): that one line changes,
every other line and comment stays as the researcher wrote it.
"""

import os
import re
import stat
import tempfile
import tomllib
from pathlib import Path

from researcher.client import Registry

URL_VARIABLE = "PHT_REGISTRY_URL"
TOKEN_VARIABLE = "PHT_TOKEN"
IDENTITY_VARIABLE = "PHT_IDENTITY"
CA_BUNDLE_VARIABLE = "PHT_CA_BUNDLE"
CONFIG_VARIABLE = "PHT_CONFIG"
DEFAULT_CONFIG_FILE = Path("~/.config/pht/researcher.toml")

# One line setting identity_file to a one-line string, perhaps with a comment after it: the only shape of the
# setting record_identity_file rewrites in place (anything else, a multi-line string say, is left to a person).
_IDENTITY_FILE_LINE = re.compile(r"""(?P<key>[ \t]*identity_file[ \t]*=[ \t]*)"""
                                 r"""(?P<value>"(?:[^"\\]|\\.)*"|'[^']*')(?P<rest>[ \t]*(?:#.*)?)""")


class SettingsError(Exception):
    """The URL or token is missing or unreadable; the message says where to put it."""


def config_file_path(config_file=None):
    """The researcher's config file: config_file if given, else $PHT_CONFIG, else ~/.config/pht/researcher.toml."""
    return Path(config_file or os.environ.get(CONFIG_VARIABLE) or DEFAULT_CONFIG_FILE).expanduser()


def connect(registry_url=None, config_file=None, identity_file=None):
    """A Registry from the environment or the config file; registry_url and identity_file, when given, win over
    both (for the identity: the argument, then PHT_IDENTITY, then the config file's identity_file)."""
    config_file = config_file_path(config_file)
    from_file = _read_config_file(config_file)
    url = registry_url or os.environ.get(URL_VARIABLE) or from_file.get("registry_url")
    token = os.environ.get(TOKEN_VARIABLE) or from_file.get("token")
    if not url:
        raise SettingsError(f"no registry URL: set {URL_VARIABLE} or put registry_url = \"...\" in {config_file}")
    if not token:
        raise SettingsError(f"no researcher token: set {TOKEN_VARIABLE} or put token = \"...\" in {config_file} "
                            "(the registry's operator issues it with create-researcher)")
    identity_sources = [(identity_file, "as given"), (os.environ.get(IDENTITY_VARIABLE), f"from {IDENTITY_VARIABLE}"),
                        (from_file.get("identity_file"), f"identity_file in {config_file}")]
    identity_file, identity_source = next(((value, source) for value, source in identity_sources if value),
                                          (None, None))
    if identity_file and not Path(identity_file).expanduser().is_file():
        raise SettingsError(f"the identity file {identity_file} ({identity_source}) is not a file; give the file "
                            f"keygen wrote ({IDENTITY_VARIABLE}, or identity_file in {config_file})")
    ca_bundle = os.environ.get(CA_BUNDLE_VARIABLE) or from_file.get("ca_bundle")
    if ca_bundle and not Path(ca_bundle).expanduser().is_file():
        raise SettingsError(f"the CA bundle {ca_bundle} is not a file; give the PEM file of the CA that signs the "
                            f"registry's certificate ({CA_BUNDLE_VARIABLE}, or ca_bundle in {config_file})")
    return Registry(url, token, identity_file=identity_file,
                    ca_bundle=Path(ca_bundle).expanduser() if ca_bundle else None)


def _read_config_file(path):
    """The settings in the config file at path ({} when there is none); SettingsError if it cannot be read."""
    return _parsed_settings(_config_text(path), path)


def _parsed_settings(text, path):
    try:
        settings = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"{path}: cannot read it as TOML: {error}") from None
    unknown = set(settings) - {"registry_url", "token", "identity_file", "ca_bundle"}
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; "
                            "only registry_url, token, identity_file and ca_bundle are read")
    return settings


def identity_file_recordable(config_file, identity_file):
    """The identity_file config_file sets now (None if it sets none), once it is checked that record_identity_file
    can set it to identity_file; SettingsError, naming the fix, if it cannot."""
    text = _config_text(Path(config_file))
    with_identity_file(text, identity_file, config_file)
    return tomllib.loads(text).get("identity_file")


def record_identity_file(config_file, identity_file):
    """Set identity_file = "<identity_file>" in config_file (made, mode 0600, if there is none), every other line
    kept as it was. The file is replaced whole, so a reader never sees half of it; a link is followed, so a
    config kept elsewhere (dotfiles) stays linked. SettingsError, with nothing written, when it cannot be done
    safely."""
    config_file = Path(config_file).resolve()
    exists = config_file.exists()
    updated = with_identity_file(_config_text(config_file), identity_file, config_file)
    temporary = None
    try:
        config_file.parent.mkdir(parents=True, exist_ok=True)
        # It holds the token: a new file is the researcher's alone, an existing one keeps the mode they gave it.
        mode = stat.S_IMODE(config_file.stat().st_mode) if exists else 0o600
        descriptor, temporary = tempfile.mkstemp(dir=config_file.parent, prefix=f".{config_file.name}.")
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
            file.write(updated)
        os.chmod(temporary, mode)
        os.replace(temporary, config_file)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):  # a folder the researcher may not write (a config an administrator keeps)
            raise SettingsError(f"{config_file}: cannot write it ({error.strerror or error}); put identity_file = "
                                f"\"{identity_file}\" there yourself, or set {IDENTITY_VARIABLE}") from None
        raise


def _config_text(config_file):
    try:
        return config_file.read_text(encoding="utf-8") if config_file.exists() else ""
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"{config_file}: cannot read it as TOML: {error}") from None


def with_identity_file(text, identity_file, path):
    """Pure: the config file's text (path names it in messages) with identity_file set, every other line as it
    was: the setting's line changed in place, or a line added at the end. SettingsError when the file is not
    valid, or the setting is written in a way this does not rewrite (the result is checked by reading it back)."""
    settings = _parsed_settings(text, path)
    try:
        str(identity_file).encode("utf-8")
    except UnicodeEncodeError:
        raise SettingsError(f"the path {identity_file} is not UTF-8, which a TOML file cannot hold; set "
                            f"{IDENTITY_VARIABLE} to it instead") from None
    value = _toml_string(str(identity_file))
    by_hand = f"put identity_file = {value} in {path} by hand, or set {IDENTITY_VARIABLE}"
    lines = text.splitlines(keepends=True)
    setting_lines = [(number, match) for number, line in enumerate(lines)
                     if (match := _IDENTITY_FILE_LINE.fullmatch(line.rstrip("\r\n")))]
    if "identity_file" not in settings:
        newline = "\r\n" if "\r\n" in text else "\n"
        separator = newline if text and not text.endswith("\n") else ""
        updated = f"{text}{separator}identity_file = {value}{newline}"
    elif len(setting_lines) == 1:
        [(number, match)] = setting_lines
        ending = lines[number][len(lines[number].rstrip("\r\n")):]
        lines[number] = f"{match['key']}{value}{match['rest']}{ending}"
        updated = "".join(lines)
    else:
        raise SettingsError(f"{path}: cannot tell which line sets identity_file; {by_hand}")
    try:
        read_back = tomllib.loads(updated)
    except tomllib.TOMLDecodeError:
        read_back = None
    if read_back != {**settings, "identity_file": str(identity_file)}:
        raise SettingsError(f"{path}: identity_file cannot be written there without changing something else; "
                            f"{by_hand}")
    return updated


def _toml_string(text):
    """text as a TOML basic string: quotes, backslashes and the control characters TOML forbids escaped."""
    def spelled(char):
        if char in '"\\':
            return "\\" + char
        if ord(char) < 0x20 or char == "\x7f":
            return f"\\u{ord(char):04x}"
        return char
    return '"' + "".join(spelled(char) for char in text) + '"'
