"""Encrypting what leaves the site to its intended readers' age public keys.

A file is encrypted once and the ciphertext kept in the run's folder: age output differs
every time, so a retry after a crash must resend the very same bytes, or the receiver would
see two different files under one name.
"""

import os
from pathlib import Path

import pyrage


def parse_public_key(text):
    """The age recipient, or ValueError with the reason (used to check the site config)."""
    try:
        return pyrage.x25519.Recipient.from_str(text)
    except pyrage.RecipientError as error:
        raise ValueError(f"{text!r} is not an age public key (age1...): {error}") from None


def encrypt_once(source, destination, public_keys):
    """destination: source encrypted to every key, made now or kept from an earlier attempt."""
    destination = Path(destination)
    if not destination.exists():
        partial = destination.with_name(destination.name + ".partial")
        pyrage.encrypt_file(str(source), str(partial), [parse_public_key(key) for key in public_keys])
        os.replace(partial, destination)
    return destination
