"""Where the images a site runs come from, and which exact image runs.

Normally an image is pulled from its registry every time (so a moved tag is picked
up) and then run by the digest that was pulled: a tag moved between pull and run
cannot swap the image. An air-gapped site instead has an operator drop `docker save`
archives into image_import_folder; the runner loads each one, remembers which image
(by content id) every name in it stands for, and deletes the archive only after a
successful load. A task naming such an image runs that image, by its id, without
asking any registry. Either way the whitelist was checked before (runner.py).
"""

import json
import logging
import os
import tarfile
import threading
from dataclasses import dataclass

import docker

from client.containers import image_details
from client.image_policy import InvalidReference, parse_image_reference

log = logging.getLogger("pht.runner")

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ImageUnavailable(Exception):
    """Neither the registry nor the import folder provided the image; the message says why."""


@dataclass(frozen=True)
class PinnedImage:
    run_reference: str  # what the container is created from: name@sha256:... or the image id
    digest: str  # reported to the registry as the image that ran
    details: dict  # containers.image_details


class ImageSource:
    def __init__(self, engine, import_folder, record_path):
        self.engine = engine
        self.import_folder = import_folder
        self.record_path = record_path
        self._lock = threading.Lock()  # runs fetch images in parallel threads
        self._failed_archives = set()

    def fetch(self, reference):
        """Make the image present and return it pinned; raises ImageUnavailable."""
        self.load_dropped_archives()
        imported = self._imported(reference)
        if imported:
            return imported
        try:
            image = self.engine.images.pull(reference.name, tag=reference.digest or reference.tag or "latest")
        except docker.errors.APIError as error:
            raise ImageUnavailable(f"pulling {reference.pull_reference} failed: {error.explanation}") from None
        return pinned_by_registry_digest(image, reference)

    def load_dropped_archives(self):
        if self.import_folder is None:
            return
        with self._lock:
            for archive in sorted(self.import_folder.iterdir()):
                if archive.name.endswith(ARCHIVE_SUFFIXES) and archive.is_file():
                    self._load(archive)

    def _load(self, archive):
        try:
            info = archive.stat()
        except FileNotFoundError:  # the operator took it away again
            return
        # An archive that failed is tried again only once it changed (say, its copy completed).
        fingerprint = (archive.name, info.st_size, info.st_mtime)
        if fingerprint in self._failed_archives:
            return
        try:
            names = archive_image_names(archive)
            if not names:
                raise ValueError("it names no image; make it with `docker save NAME:TAG -o FILE`")
            with open(archive, "rb") as data:
                self.engine.images.load(data)
            loaded = {name: self.engine.images.get(name).id for name in names}
        except (OSError, ValueError, KeyError, tarfile.TarError, docker.errors.DockerException) as error:
            self._failed_archives.add(fingerprint)
            log.warning("image import: %s could not be loaded (%s); it stays in %s",
                        archive.name, error, self.import_folder)
            return
        record = self._record()
        record.update(loaded)
        _write_json(self.record_path, record)
        archive.unlink()
        log.info("image import: loaded %s from %s, and removed the archive", ", ".join(loaded), archive.name)

    def _imported(self, reference):
        record = self._record()
        if reference.digest:
            # A `docker save` archive carries no registry digest, so here the digest must be the image id.
            image_id = next((i for name, i in record.items()
                             if i == reference.digest and parse_image_reference(name).name == reference.name), None)
        else:
            image_id = record.get(reference.normalised)
        if image_id is None:
            return None
        try:
            image = self.engine.images.get(image_id)
        except docker.errors.ImageNotFound:
            log.warning("image import: %s was imported but is gone from Docker; drop its archive in again",
                        reference.normalised)
            return None
        return PinnedImage(run_reference=image_id, digest=image_id, details=image_details(image))

    def _record(self):
        """Normalised name -> image id, for every image loaded from the import folder."""
        try:
            return json.loads(self.record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}


def archive_image_names(archive):
    """The normalised names a `docker save` archive gives its images (its manifest.json's RepoTags)."""
    with tarfile.open(archive, "r:*") as tar:
        member = tar.extractfile("manifest.json")  # KeyError if missing
        if member is None:
            raise ValueError("its manifest.json is not a file")
        manifest = json.load(member)
    names = []
    for image in manifest:
        for tag in image.get("RepoTags") or []:
            try:
                names.append(parse_image_reference(tag).normalised)
            except InvalidReference:
                log.warning("image import: %s names %r, which is not an image reference; ignored", archive, tag)
    return names


def pinned_by_registry_digest(image, reference):
    """name@sha256:... as the registry knows the pulled image; running that cannot pick up a moved tag."""
    for repo_digest in image.attrs.get("RepoDigests") or []:
        name, _, digest = repo_digest.partition("@")
        if name in (reference.name, reference.repository, reference.repository.removeprefix("library/")):
            return PinnedImage(run_reference=f"{reference.name}@{digest}", digest=digest, details=image_details(image))
    # No registry digest under this name (unusual); the content id pins the image just as well.
    return PinnedImage(run_reference=image.id, digest=image.id, details=image_details(image))


def _write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(temporary, path)
