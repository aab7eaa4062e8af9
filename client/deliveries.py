"""Files an algorithm addresses to a third party, sent straight there instead of to the registry.

An algorithm writes /output/to/<recipient>/<file>. After the container ends, the runner takes
the to/ folder out of the output (so the registry never sees it), checks that every recipient
is one this site's config allows, encrypts each file to that recipient's *pinned* public key
and sends it to the recipient's FileService; the registry only gets a receipt (name, size,
sha256 of the ciphertext). A file for a recipient the site does not know fails the run before
anything is sent anywhere.

The FileService files it under the run's task (PUT /files/<task id>/<file>.age), so the same
file name from another task is another file there, not a conflict after the container ran.

    run folder/outbox/<recipient>/<file>.age   encrypted, kept until the run is reported
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import requests

from client.encryption import encrypt_once
from client.registry_client import send_reliably, sha256_of
from common import names
from common.printable import printable, shown

ADDRESSED_FOLDER = "to"
ENCRYPTED_SUFFIX = ".age"


class DeliveryRefused(Exception):
    """A recipient's FileService refused a file (a revoked token, say); retrying cannot help."""


@dataclass(frozen=True)
class Recipient:
    """A third party this site may send files to, as its config declares it."""
    name: str
    url: str
    public_key: str
    token: str


def addressed_files(output_dir):
    """[(recipient name, file path)] under output/to/; no I/O beyond listing."""
    addressed = Path(output_dir) / ADDRESSED_FOLDER
    if not addressed.is_dir() or addressed.is_symlink():
        return []
    return [(folder.name, path) for folder in sorted(addressed.iterdir()) if folder.is_dir() and not folder.is_symlink()
            for path in sorted(folder.iterdir())]


def delivery_problem(addressed, recipients):
    """Pure: why these files cannot be delivered (None if they can). Checked before anything is sent."""
    for recipient, path in addressed:
        # Names the algorithm chose: the reason reaches logs and the researcher's terminal.
        where = printable(f"/output/{ADDRESSED_FOLDER}/{recipient}/{path.name}")
        if recipient not in recipients:
            allowed = ", ".join(sorted(recipients)) or "none"
            return (f"{where} is addressed to {shown(recipient)}, which is not a recipient this site allows "
                    f"(allowed: {allowed}); nothing was sent")
        if path.is_symlink() or not path.is_file():
            return f"{where} is not a regular file; only files can be sent; nothing was sent"
        # It reaches the FileService encrypted, as NAME.age, which must follow the FileService's rule.
        if not names.is_file_name(f"{path.name}{ENCRYPTED_SUFFIX}"):
            return (f"{where}: a file name may have {names.FILE_NAME_RULE} (with {ENCRYPTED_SUFFIX} added); "
                    "nothing was sent")
    return None


def set_aside(output_dir, outbox, recipients):
    """Move output/to/ out of the output and encrypt each file for its recipient; returns a failure
    reason or None. After a failure nothing is in the outbox, so nothing is sent."""
    addressed = addressed_files(output_dir)
    problem = delivery_problem(addressed, recipients)
    if problem is None:
        for recipient, path in addressed:
            folder = Path(outbox) / recipient
            folder.mkdir(parents=True, exist_ok=True)
            encrypt_once(path, folder / f"{path.name}{ENCRYPTED_SUFFIX}", [recipients[recipient].public_key])
    shutil.rmtree(Path(output_dir) / ADDRESSED_FOLDER, ignore_errors=True)
    return problem


def deliver(outbox, recipients, task_id, record_receipt, retry_for_seconds, ca_bundle=None):
    """Send every file in the outbox to its recipient's FileService, filed under the run's task_id (an int, as
    the claim gave it), then record a receipt for it.

    Sending again after a crash is harmless: the FileService accepts the same file twice for a task, and
    the registry the same receipt.
    """
    for folder in sorted(Path(outbox).iterdir()) if Path(outbox).is_dir() else []:
        recipient = recipients[folder.name]
        for path in sorted(folder.glob(f"*{ENCRYPTED_SUFFIX}")):
            sha256 = sha256_of(path)

            def send(path=path, sha256=sha256):
                with open(path, "rb") as body:
                    return requests.put(f"{recipient.url.rstrip('/')}/files/{task_id}/{path.name}", data=body,
                                        timeout=300, verify=str(ca_bundle) if ca_bundle else True,
                                        headers={"Authorization": f"Bearer {recipient.token}",
                                                 "X-Content-SHA256": sha256})

            response = send_reliably(send, f"delivery of {path.name} to {recipient.name}", retry_for_seconds,
                                     peer=recipient.name)
            if not response.ok:
                raise DeliveryRefused(f"{recipient.name}'s FileService refused {path.name}: "
                                      f"{response.status_code} {response.text.strip()[:300]}")
            record_receipt(recipient.name, path.name, path.stat().st_size, sha256)
