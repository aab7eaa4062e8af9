"""Pinning an image reference to the digest its tag names now, so that a tag moved after a task is posted
cannot change what the sites run (sites require references pinned by digest unless told otherwise).

The digest comes from the image registry, through this machine's Docker engine and its login (`docker
login`), so a private registry answers as it does to `docker pull`; nothing is pulled.
"""

from contextlib import closing

import docker
import requests

from common import names



class ImageNotPinned(Exception):
    """A tag could not be resolved to its digest. `reason` says why; str() names the ways to go on."""

    def __init__(self, reference, image_registry, reason):
        self.reference = reference
        self.image_registry = image_registry
        self.reason = reason
        super().__init__(self.explain("pass pin_digest=False"))

    def explain(self, opting_out):
        """The message, with the caller's way of opting out of pinning (a parameter, a CLI flag)."""
        return (f"cannot pin {self.reference} to a digest ({self.reason}): give the image pinned by digest "
                f"(name@sha256:...), or let this machine's Docker engine reach {self.image_registry} (docker login), "
                f"or {opting_out} if every site accepts tags")


def is_pinned(reference):
    return names.pinned_digest(reference) is not None


def pin_to_digest(reference):
    """reference as name:tag@sha256:<digest of what the tag names now>; one already pinned is returned as is.

    The tag stays in the reference because sites' whitelists may match on it; the digest decides what runs.
    Raises ImageNotPinned when the engine or the image registry cannot say.
    """
    if is_pinned(reference):
        return reference
    try:
        image_registry, _ = docker.auth.resolve_repository_name(reference)
    except docker.errors.InvalidRepository as error:
        raise ImageNotPinned(reference, "its image registry", f"not an image reference: {error}") from None
    try:
        with closing(docker.from_env()) as engine:
            digest = engine.images.get_registry_data(reference).id
    except docker.errors.NotFound as error:
        raise ImageNotPinned(reference, image_registry, f"the image registry has no such image or tag: "
                                                        f"{error.explanation}") from None
    except docker.errors.APIError as error:
        if error.status_code == 400:  # the engine would not even parse it
            raise ImageNotPinned(reference, image_registry, f"not an image reference: {error.explanation}") from None
        raise ImageNotPinned(reference, image_registry, f"the Docker engine could not ask {image_registry}: "
                                                        f"{error.explanation}") from None
    except (docker.errors.DockerException, requests.RequestException) as error:  # the latter: a timeout, say
        raise ImageNotPinned(reference, image_registry, f"no Docker engine answers here: {error}") from None
    if not names.IMAGE_DIGEST.fullmatch(digest or ""):
        raise ImageNotPinned(reference, image_registry, f"the engine answered {digest!r}, not a sha256 digest")
    return f"{reference}@{digest}"
