"""Which images this site runs: parsing image references and checking them against the whitelist.

Pure decisions, no I/O. A whitelist entry is a regular expression that must match
the *whole* reference (re.fullmatch), either as the task wrote it or in its
normalised form, so `myconsortium/.*` cannot be satisfied by `evil.io/myconsortium/x`
or by `myconsortium/x` hidden inside a longer name.
"""

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # what a reference pins an image to, and what a site approves

# Docker's reference grammar (distribution/reference), without the rarely used IPv6 hosts.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)/)?"
    rf"(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    rf"(?:@(?P<digest>{DIGEST.pattern}))?")


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True)
class ImageReference:
    written: str
    registry: str
    repository: str  # path within the registry, e.g. library/ubuntu
    tag: str | None
    digest: str | None

    @property
    def name(self):
        """registry/repository: what `docker pull` needs before the tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def normalised(self):
        """registry/repository:tag, with @digest when the reference gave one."""
        if self.digest:
            tag = f":{self.tag}" if self.tag else ""
            return f"{self.name}{tag}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"

    @property
    def pull_reference(self):
        """A digest wins over a tag: it names exactly one image."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag or 'latest'}"


def parse_image_reference(written):
    match = _REFERENCE.fullmatch(written)
    if not match:
        raise InvalidReference(f"{written!r} is not a valid image reference")
    domain, path = match["domain"], match["path"]
    # Like Docker: the first component is a registry only if it looks like a host name.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        if domain != domain.lower():
            raise InvalidReference(f"{written!r} is not a valid image reference (repository names are lowercase)")
        path = f"{domain}/{path}"
        domain = None
    registry = domain or DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    return ImageReference(written, registry, path, match["tag"], match["digest"])


def refusal_reason(written, whitelist, require_digest=False):
    """None if the site may run this image, else the reason it may not (pure)."""
    try:
        reference = parse_image_reference(written)
    except InvalidReference as error:
        return str(error)
    if not any(pattern.fullmatch(written) or pattern.fullmatch(reference.normalised) for pattern in whitelist):
        return f"image {written!r} (normalised {reference.normalised!r}) matches no entry of this site's whitelist"
    if require_digest and reference.digest is None:
        # A tag can be moved to another image after the task was posted; a digest names one image for good.
        return (f"this site runs only images pinned by digest (@sha256:...); {written!r} names only a tag: post "
                "the task with the researcher library or CLI, which pin the tag, or give name:tag@sha256:...")
    return None
