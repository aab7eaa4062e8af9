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


def keys_for(claim, pinned_keys):
    """(keys to encrypt the run's output and log to, empty for none; or the reason to refuse the run).

    pinned_keys: researcher name -> the keys this site pinned for them, or None if it pins none. Without
    pinning the registry's list is used as it is. With pinning, a key the site has not pinned for the
    task's researcher refuses the run, and a researcher with pinned keys always gets results encrypted to
    exactly those: a registry can neither add a reader nor strip the encryption.
    """
    if pinned_keys is None:
        return claim.recipients, None
    if claim.researcher is None:
        return (), ("this site pins researchers' keys (researcher_keys), but the registry did not say whose task "
                    "this is; the registry must be upgraded")
    own = pinned_keys.get(claim.researcher, ())
    unpinned = [key for key in claim.recipients if key not in own]
    if unpinned:
        return (), (f"the task of researcher {claim.researcher!r} asks to encrypt results to {unpinned[0]}, a key "
                    f"this site has not pinned for {claim.researcher!r} (researcher_keys in its config); if it is "
                    "theirs, the site's IT officer adds it there")
    return tuple(own), None


def encrypt_once(source, destination, public_keys):
    """destination: source encrypted to every key, made now or kept from an earlier attempt."""
    destination = Path(destination)
    if not destination.exists():
        partial = destination.with_name(destination.name + ".partial")
        pyrage.encrypt_file(str(source), str(partial), [parse_public_key(key) for key in public_keys])
        os.replace(partial, destination)
    return destination
