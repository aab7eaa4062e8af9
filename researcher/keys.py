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


def decrypt(ciphertext, identities, what):
    if not identities:
        raise DecryptionFailed(f"{what} is encrypted: give your identity file (identity_file=..., or PHT_IDENTITY)")
    try:
        return pyrage.decrypt(ciphertext, identities)
    except pyrage.DecryptError as error:
        raise DecryptionFailed(f"{what} does not decrypt with your identity ({error}): "
                               "it was encrypted to other public keys") from None
