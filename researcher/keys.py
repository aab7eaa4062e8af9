"""The researcher's age key pair: results of encrypted tasks are readable with it and nothing else.

The private key (an "identity") is written to a file only its owner can read and never leaves
this machine; only the public key is registered at the registry. Files are in age's own format,
so `age --decrypt -i FILE` reads the same results without this library.
"""

import os
from pathlib import Path

import pyrage

AGE_HEADER = b"age-encryption.org/v1\n"


class DecryptionFailed(Exception):
    pass


class IdentityMissing(DecryptionFailed):
    """A result is encrypted and no identity was given to open it; `what` names it ("the output of run 7 from
    ...") for a message that names the caller's own way of giving one."""

    def __init__(self, what):
        self.what = what
        super().__init__(f"{what} is encrypted: give your identity file (identity_file=..., or PHT_IDENTITY)")


def generate_identity(path):
    """Write a new private key to path (refusing to overwrite one); returns its public key."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = pyrage.x25519.Identity.generate()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists already; keep it, or choose another file") from None
    with os.fdopen(descriptor, "w") as file:
        file.write(f"# public key: {identity.to_public()}\n{identity}\n")
    return str(identity.to_public())


def load_identity(path):
    path = Path(path).expanduser()
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not lines:
        raise DecryptionFailed(f"{path} holds no age identity (AGE-SECRET-KEY-...)")
    return pyrage.x25519.Identity.from_str(lines[0])


def require_identity(identities, what):
    """Raises IdentityMissing when there is no identity to open what ("the output of run 7 from ...") with."""
    if not identities:
        raise IdentityMissing(what)


def decrypt_file(source, target, identities, what):
    """Decrypt the file source into the file target as a stream, one of age's 64 KiB chunks at a time, so a
    result of any size never lies whole in memory. what names it in messages ("the output of run 7 from ...")."""
    require_identity(identities, what)
    try:
        pyrage.decrypt_file(str(source), str(target), identities)
    except pyrage.DecryptError as error:
        raise DecryptionFailed(f"{what} does not decrypt with your identity ({error}): "
                               "it was encrypted to other public keys") from None
    except OSError as error:  # how pyrage reports a chunk that fails its check, as well as a disk that is full
        raise DecryptionFailed(f"{what} could not be decrypted ({error}): it was cut short or altered "
                               "after the site encrypted it, or this machine could not write it") from None
