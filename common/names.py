"""The shapes of names and digests that cross a boundary, written once for every part.

Each is matched whole (fullmatch): with re.match and "$", "hospital-a\\n" would pass, since "$" also
matches before a final newline.
"""

import re

# A site's or researcher's name: a DNS label (RFC 1123). It becomes a folder name on researchers'
# machines and is shown in logs and terminals, so it has no room for "..", "/", spaces or escapes.
PRINCIPAL_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
PRINCIPAL_NAME_RULE = ("1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit "
                       "(a DNS label, e.g. hospital-a)")

# A file a FileService keeps, and a recipient's name in a site's config: one path component, nothing
# hidden, nothing a file system could read as "go elsewhere" (no ".." anywhere in it).
FILE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
FILE_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters, no '..'"

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What a pinned reference names an image by (…@sha256:…), and what a site reports it ran.
IMAGE_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
PINNED = re.compile(rf"@({IMAGE_DIGEST.pattern})\Z")  # \Z: "$" would also match before a final newline


def pinned_digest(reference):
    """The digest an image reference is pinned to (name…@sha256:…), or None."""
    found = PINNED.search(reference)
    return found.group(1) if found else None


def principal_name_problem(name, role):
    """Pure: why name cannot be a site's or researcher's (role says which), or None."""
    if isinstance(name, str) and PRINCIPAL_NAME.fullmatch(name):
        return None
    return f"{role} name {name!r} is not allowed: use {PRINCIPAL_NAME_RULE}"


def is_file_name(name):
    return isinstance(name, str) and FILE_NAME.fullmatch(name) is not None

# A claim carries its task's input (base64) when the input is at most this long, and a site's finish report its
# run's output and log when each is: each spares a request. Anything longer goes by a request of its own. Neither
# side sends more, or takes more. A multiple of 3, so that a bound on the base64 text is this bound exactly.
MAX_INLINE_BYTES = 48 * 1024
MAX_INLINE_BASE64_CHARS = MAX_INLINE_BYTES // 3 * 4
