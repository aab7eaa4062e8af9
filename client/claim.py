"""A claim from the registry, checked before the runner acts on any of it.

The registry may be compromised, so a claim is data from outside: every field is
checked here, once, into a typed Claim, and nothing behind this edge looks at the raw
answer again. Ids must be positive integers in the registry's range (paths and
container labels are made from them), the lease id plain characters (it travels in
an HTTP header), times within bounds, encryption keys real age public keys, and the
image a reference that parses, a task's input sent with the claim base64 of at most
MAX_INLINE_BYTES, and the results the finish report may carry no larger. Fields this runner
does not know are ignored, so a newer registry may add some; a missing or malformed field
makes the claim invalid.
"""

import base64
import binascii
import re
from dataclasses import asdict, dataclass, field

from client.encryption import parse_public_key
from client.image_policy import InvalidReference, parse_image_reference
from common.names import MAX_INLINE_BASE64_CHARS, MAX_INLINE_BYTES
from common.printable import shown

INT_MAX = 2 ** 31 - 1  # the registry's ids are 32-bit
LEASE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MIN_LEASE_SECONDS, MAX_LEASE_SECONDS = 3, 24 * 3600
MAX_IMAGE_CHARS = 512
MAX_NAME_CHARS = 256
MAX_RESEARCHER_CHARS = 128
MAX_RECIPIENTS = 20


class InvalidClaim(ValueError):
    """What is wrong with a claim, and whatever of it could be read to refuse it at the registry."""

    def __init__(self, problems, run_id=None, lease_id=None):
        self.problems = problems
        self.run_id, self.lease_id = run_id, lease_id
        super().__init__("; ".join(problems))

    @property
    def refusable(self):
        """Whether the registry can be told: refusing needs the run's id and lease."""
        return self.run_id is not None and self.lease_id is not None


@dataclass(frozen=True)
class Claim:
    id: int
    task_id: int
    session_id: int
    image: str
    lease_id: str
    lease_seconds: int
    timeout_seconds: int | None
    recipients: tuple  # age public keys to encrypt output and log to; empty: not encrypted
    name: str | None
    researcher: str | None  # who posted the task (None from a registry too old to say)
    # How large an output or log the finish report may carry (0: none; a registry before API 1.4).
    inline_result_bytes: int = 0
    # The registry started the run with the claim (the site asked it to: start_pinned), so no start report is sent.
    # None: a registry before API 1.6, which cannot be asked.
    started: bool | None = None
    # The task's input when the claim carried it; None: download it. Kept in the run's folder as its input file,
    # not with the claim.
    input: bytes | None = field(default=None, repr=False)

    def as_dict(self):
        """As the registry sent it, without the input (as it is kept in the run's folder)."""
        fields = asdict(self)
        fields["recipients"] = list(self.recipients)
        del fields["input"]
        return fields


def parse_claim(raw):
    """The claim as a Claim; raises InvalidClaim naming every problem found."""
    if not isinstance(raw, dict):
        raise InvalidClaim([f"a claim must be a JSON object, not {shown(raw)}"])
    problems = []

    def take(name, check, optional=False):
        if name not in raw:
            if not optional:
                problems.append(f"{name} is missing")
            return None
        value = raw[name]
        if value is None and optional:
            return None
        problem = check(value)
        if problem:
            problems.append(f"{name} {problem} (the registry sent {shown(value)})")
            return None
        return value

    run_id = take("id", _id)
    lease_id = take("lease_id", _lease_id)
    claim = dict(
        id=run_id, lease_id=lease_id,
        task_id=take("task_id", _id),
        session_id=take("session_id", _id),
        image=take("image", _image),
        lease_seconds=take("lease_seconds", _whole_number(MIN_LEASE_SECONDS, MAX_LEASE_SECONDS)),
        timeout_seconds=take("timeout_seconds", _whole_number(1, INT_MAX), optional=True),
        recipients=take("recipients", _recipients, optional=True),
        name=take("name", _name, optional=True),
        researcher=take("researcher", _researcher, optional=True),
        inline_result_bytes=take("inline_result_bytes", _whole_number(0, MAX_INLINE_BYTES), optional=True),
        started=take("started", _boolean, optional=True),
        input=take("input_base64", _inline_input, optional=True),
    )
    if problems:
        raise InvalidClaim(problems, run_id, lease_id)
    claim["recipients"] = tuple(claim["recipients"] or ())
    claim["inline_result_bytes"] = claim["inline_result_bytes"] or 0
    if claim["input"] is not None:
        claim["input"] = base64.b64decode(claim["input"], validate=True)
    return Claim(**claim)


def _whole_number(least, most):
    def check(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be a whole number"
        if not least <= value <= most:
            return f"must be between {least} and {most}"
        return None
    return check


_id = _whole_number(1, INT_MAX)


def _lease_id(value):
    if not isinstance(value, str) or not LEASE_ID.fullmatch(value):
        return "must be 1 to 64 letters, digits, '_' or '-'"
    return None


def _image(value):
    if not isinstance(value, str) or not 0 < len(value) <= MAX_IMAGE_CHARS:
        return f"must be an image reference of at most {MAX_IMAGE_CHARS} characters"
    try:
        parse_image_reference(value)
    except InvalidReference:
        return "is not a valid image reference"
    return None


def _recipients(value):
    if not isinstance(value, list) or len(value) > MAX_RECIPIENTS:
        return f"must be a list of at most {MAX_RECIPIENTS} age public keys"
    for key in value:
        try:
            parse_public_key(key if isinstance(key, str) else "")
        except ValueError:
            return "must hold age public keys (age1...) only"
    return None


def _inline_input(value):
    problem = f"must be base64 of at most {MAX_INLINE_BYTES} bytes"
    # Its length is checked before it is decoded: a registry's megabytes are refused without a copy.
    if not isinstance(value, str) or len(value) > MAX_INLINE_BASE64_CHARS:
        return problem
    try:
        base64.b64decode(value, validate=True)
    except binascii.Error:
        return problem
    return None


def _boolean(value):
    return None if isinstance(value, bool) else "must be true or false"


def _researcher(value):
    if not isinstance(value, str) or not 0 < len(value) <= MAX_RESEARCHER_CHARS:
        return f"must be a name of at most {MAX_RESEARCHER_CHARS} characters"
    return None


def _name(value):
    if not isinstance(value, str) or len(value) > MAX_NAME_CHARS:
        return f"must be text of at most {MAX_NAME_CHARS} characters"
    return None
