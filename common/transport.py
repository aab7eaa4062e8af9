"""How the site runner and the researcher's tools reach the registry and the FileService: over TLS with
the certificate verified (against the system's CAs, or a private CA's bundle), or in plain HTTP only on
this machine's loopback, where nothing crosses a network."""

import ipaddress
from urllib.parse import urlsplit


def plain_http_warning(url):
    """Pure: a warning when url is plain HTTP to anything but loopback (tokens and results would cross the
    network readable), else None."""
    parts = urlsplit(url)
    if parts.scheme != "http" or is_loopback(parts.hostname or ""):
        return None
    return (f"{url} is plain HTTP: tokens and results cross the network unencrypted; use https:// "
            "(with a private CA: give its bundle as ca_bundle)")


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
