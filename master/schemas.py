"""Request and response shapes of the REST API, declared once.

apiflask derives both the validation of requests and the OpenAPI document
(served at /openapi.json) from these, so the document cannot drift from the code.
"""

import base64
import binascii
import re
from datetime import datetime, timezone

from apiflask import Schema
from apiflask.fields import Boolean, DateTime, Integer, List, Nested, String
from apiflask.validators import Length, OneOf, Range, Regexp
from marshmallow import ValidationError, validates_schema

from common import names
from master import lifecycle

# An image reference as Docker parses it: [registry[:port]/]path[:tag][@sha256:digest].
# The site runner checks it again against its whitelist; this only rejects nonsense early.
IMAGE_REFERENCE = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    rf"(?::[\w][\w.-]{{0,127}})?(?:@{names.IMAGE_DIGEST.pattern})?", re.ASCII)

# Ids and counts are 32-bit integers in the database (PostgreSQL's integer); larger numbers
# cannot name anything stored, so they are rejected up front instead of failing in SQL.
INT_MAX = 2 ** 31 - 1
# Counts of what a run used are 64-bit (BigInteger: PostgreSQL's bigint, SQLite's integer).
BIGINT_MAX = 2 ** 63 - 1

# An age X25519 recipient: "age1" and 58 characters of bech32.
AGE_PUBLIC_KEY = re.compile(r"age1[023456789acdefghjklmnpqrstuvwxyz]{58}")

# Shown as it is in listings: no room for escapes or line breaks.
PRINTABLE_ASCII_64 = re.compile(r"[ -~]{0,64}")

RUN_STATES = [str(state) for state in lifecycle.CURRENT_STATES]
TASK_STATES = [str(state) for state in lifecycle.TaskStatus]


class Matches(Regexp):
    """The whole value matches pattern. marshmallow's Regexp checks with re.match, where "$" also matches
    before a final newline ("logreg:1.0\\n" would pass); the document shows the pattern anchored."""

    def __init__(self, pattern, error):
        super().__init__(rf"^(?:{pattern.pattern})$", error=error)
        self.whole = pattern

    def __call__(self, value):
        if self.whole.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


def Sha256(**kwargs):
    return String(validate=Matches(names.SHA256_HEX, "must be a lowercase hex sha256"), **kwargs)


def ImageDigest(**kwargs):
    return Text(validate=Matches(names.IMAGE_DIGEST, "must be an image digest: sha256: and 64 lowercase hex digits"),
                **kwargs)


class Timestamp(DateTime):
    """Stored as UNIX seconds, shown as ISO 8601 in UTC."""

    def _serialize(self, value, attr, obj, **kwargs):
        if value is None:
            return None
        return super()._serialize(datetime.fromtimestamp(value, timezone.utc), attr, obj, **kwargs)


class Text(String):
    """A string the database can store: JSON allows lone UTF-16 surrogates ("\\ud800"), UTF-8 does not."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("must be valid Unicode text (no lone surrogates); "
                                  "send binary data base64-encoded") from None
        return text


class InlineBytes(String):
    """Bytes sent base64 in a JSON body, at most names.MAX_INLINE_BYTES of them: decoded. The document says so
    (format byte, maxLength), and its length is checked before it is decoded."""

    def __init__(self, **kwargs):
        super().__init__(validate=Length(max=names.MAX_INLINE_BASE64_CHARS), **kwargs)
        self.metadata.setdefault("format", "byte")

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if len(text) > names.MAX_INLINE_BASE64_CHARS:  # the validator runs only after this has decoded it
            raise ValidationError(f"must be at most {names.MAX_INLINE_BASE64_CHARS} characters of base64")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
            raise ValidationError("must be base64") from None

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else base64.b64encode(value).decode("ascii")


def Id(**kwargs):
    return Integer(validate=Range(min=1, max=INT_MAX), **kwargs)


class Count(Integer):
    """A count the database can store: a whole number from 0 to BIGINT_MAX.

    JSON may spell a whole number 5.0, which is 5; 5.5 is refused rather than cut down to 5,
    as a plain Integer field would.
    """

    def __init__(self, **kwargs):
        super().__init__(validate=Range(min=0, max=BIGINT_MAX), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, float) and not value.is_integer():
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class TaskIn(Schema):
    image = Text(required=True, validate=[Length(1, 512), Matches(
                     IMAGE_REFERENCE, error="{input!r} is not a Docker image reference such as "
                                            "registry.example.org/group/image:tag")],
                   metadata={"description": "Docker image reference the sites pull and run; pinned by digest "
                                            "(name:tag@sha256:...) for sites that run only pinned images."})
    input = Text(metadata={"description": "The configuration file as text (UTF-8). Give this or input_base64."})
    input_base64 = Text(metadata={"description": "The configuration file as base64, for binary input."})
    sites = List(Text(validate=Length(1, 128)), validate=Length(min=1), allow_none=True,
                 metadata={"description": "Names of the sites that must run the task; omit or null for all sites."})
    session_id = Id(allow_none=True, metadata={
        "description": "Session to add the task to (409 if it is closed); omit to start a new session."})
    name = Text(allow_none=True, validate=Length(max=256))
    description = Text(allow_none=True, validate=Length(max=10000))
    timeout_seconds = Integer(allow_none=True, validate=Range(min=1, max=7 * 24 * 3600),
                              metadata={"description": "Wall-clock limit for the algorithm at each site."})
    encrypt = Boolean(load_default=False, metadata={
        "description": "Sites encrypt output and log to the researcher's registered public keys."})

    # Not expressible in the OpenAPI document (OpenAPI 3.0 from these schemas); said in the
    # field descriptions instead.
    @validates_schema
    def _exactly_one_input(self, data, **kwargs):
        if ("input" in data) == ("input_base64" in data):
            raise ValidationError("give exactly one of 'input' and 'input_base64'", "input")
        if "input_base64" in data:
            try:
                base64.b64decode(data["input_base64"], validate=True)
            except (binascii.Error, ValueError) as error:  # ValueError: non-ASCII characters
                raise ValidationError(f"not valid base64: {error}", "input_base64") from None


class DeliveryOut(Schema):
    recipient = String(metadata={"description": "Who received the file, as the site's config names it."})
    name = String()
    size = Integer()
    sha256 = String(metadata={"description": "Of the file as sent (encrypted)."})
    at = Timestamp()


CARRIED_RESULT = ("The run's {kind}, base64: only in `GET /api/tasks/{{id}}?with_results=true` once the task has "
                  f"ended, when it is at most {names.MAX_INLINE_BYTES:,} bytes and the answer's results stay within "
                  "8 MiB in all; else download it. Check it against its sha256, as a download.")
SPARQL_SUMMARY = ("What the run's algorithm read through the site's SPARQL gateway: number of queries, "
                  "bytes of results, queries refused.")


class SparqlSummary(Schema):
    queries = Count(required=True, metadata={"description": "SPARQL queries the algorithm made, refused ones included."})
    bytes = Count(required=True, metadata={"description": "Bytes of query results the gateway passed to the algorithm."})
    refused = Count(required=True, metadata={"description": "Queries the gateway refused to pass on."})


class RunOut(Schema):
    id = Integer()
    site = String(metadata={"description": "Name of the site that runs it."})
    status = String(validate=OneOf(RUN_STATES))
    reason = String(allow_none=True, metadata={
        "description": "Why it failed or was refused; what it waits for while awaiting approval or held for review."})
    attempts = Integer()
    exit_code = Integer(allow_none=True)
    image_digest = String(allow_none=True, metadata={
        "description": "Digest of the image the site ran, or whose approval it waits for; for a run its claim "
                       "started (start_pinned), the digest the task's image is pinned to."})
    output_sha256 = String(allow_none=True)
    output_size = Integer(allow_none=True)
    log_sha256 = String(allow_none=True)
    log_size = Integer(allow_none=True)
    updated_at = Timestamp()
    deliveries = List(Nested(DeliveryOut), metadata={"description": "Files the site sent straight to a recipient."})
    sparql = Nested(SparqlSummary, allow_none=True, metadata={"description": SPARQL_SUMMARY})
    output_base64 = InlineBytes(metadata={"description": CARRIED_RESULT.format(kind="output archive")})
    log_base64 = InlineBytes(metadata={"description": CARRIED_RESULT.format(kind="log")})


class TaskOut(Schema):
    id = Integer()
    session_id = Integer()
    image = String()
    name = String(allow_none=True)
    description = String(allow_none=True)
    timeout_seconds = Integer(allow_none=True)
    created_at = Timestamp()
    encrypted_to = List(String(), metadata={"description": "Public keys the results are encrypted to."})
    status = String(validate=OneOf(TASK_STATES), metadata={"description": "Derived from the runs."})
    runs = List(Nested(RunOut))


class PageIn(Schema):
    page = Integer(load_default=1, validate=Range(min=1, max=1_000_000))
    per_page = Integer(load_default=50, validate=Range(min=1, max=200))


class TaskQueryIn(PageIn):
    session_id = Id()
    status = Text(validate=OneOf(TASK_STATES))


class TaskWaitIn(Schema):
    wait_seconds = Integer(load_default=0, validate=Range(min=0, max=60), metadata={
        "description": "Wait up to this long for one of the task's runs to end before answering."})
    with_results = Boolean(load_default=False, metadata={
        "description": "Once the task has ended, its runs carry their small results (`output_base64`, "
                       "`log_base64`): no download request each. Since API 1.5."})


class PageOut(Schema):
    page = Integer()
    per_page = Integer()
    total = Integer(metadata={"description": "How many items match, on all pages."})


class TaskPageOut(PageOut):
    items = List(Nested(TaskOut))


class SessionOut(Schema):
    id = Integer()
    created_at = Timestamp()
    closed_at = Timestamp(allow_none=True, metadata={
        "description": "When the researcher closed it: it takes no more tasks, and sites remove its /temp. "
                       "Null while it is open."})
    task_count = Integer(metadata={"description": "How many tasks the session has."})


class SessionPageOut(PageOut):
    items = List(Nested(SessionOut))


class ClosedSessionOut(SessionOut):
    """SessionOut, under a name of its own in the OpenAPI document: apiflask would list a class that is used
    directly after it was first used nested (in SessionPageOut, whose path is shorter) twice, as SessionOut1."""


class RunEventOut(Schema):
    status = String()
    at = Timestamp()
    reason = String(allow_none=True)


class SiteOut(Schema):
    name = String()
    online = Boolean(metadata={"description": "Whether the site polled the registry recently."})
    last_seen_at = Timestamp(allow_none=True)
    runner_version = String(allow_none=True)
    sparql_ok = Boolean(allow_none=True, metadata={"description": "Whether its SPARQL endpoint answered at its last poll."})


class SitePageOut(PageOut):
    items = List(Nested(SiteOut))


class OperatorSiteOut(SiteOut):
    revoked_at = Timestamp(allow_none=True, metadata={"description": "When the operator revoked it; null if active."})
    active_runs = Integer(metadata={"description": "Its runs that have not ended (pending, claimed, running or "
                                                   "waiting at the site)."})


class OperatorSitePageOut(PageOut):
    items = List(Nested(OperatorSiteOut))


class OperatorTaskOut(TaskOut):
    researcher = String(metadata={"description": "Who posted it."})


class OperatorTaskPageOut(PageOut):
    items = List(Nested(OperatorTaskOut))


class OperatorTaskQueryIn(PageIn):
    researcher = Text(validate=Matches(names.PRINCIPAL_NAME, f"must be a name: {names.PRINCIPAL_NAME_RULE}"),
                      metadata={"description": "Only this researcher's tasks."})
    site = Text(validate=Matches(names.PRINCIPAL_NAME, f"must be a name: {names.PRINCIPAL_NAME_RULE}"),
                metadata={"description": "Only tasks with a run at this site."})
    status = Text(validate=OneOf(TASK_STATES))


class ClaimIn(Schema):
    wait_seconds = Integer(load_default=0, validate=Range(min=0, max=120),
                           metadata={"description": "How long to wait for a run before answering 204."})
    runner_version = Text(allow_none=True, validate=Matches(
        PRINTABLE_ASCII_64, "must be at most 64 printable ASCII characters"))
    sparql_ok = Boolean(allow_none=True)
    start_pinned = Boolean(load_default=False, metadata={
        "description": "Start the claimed run at once if its image is pinned by digest (name@sha256:...): it is "
                       "running, with that digest, when the claim answers (started: true), and the site sends no "
                       "start report. For a site that needs no approval before a run. From API version 1.6."})


class ClaimedRunOut(Schema):
    id = Integer()
    task_id = Integer()
    session_id = Integer()
    image = String()
    name = String(allow_none=True)
    timeout_seconds = Integer(allow_none=True)
    recipients = List(String(), metadata={
        "description": "Encrypt output and log to these age public keys before upload; empty: do not encrypt."})
    researcher = String(metadata={"description": "Who posted the task: a site that pins researchers' keys "
                                                "encrypts only to the keys it pinned for this name."})
    lease_id = String(metadata={"description": "Send with every report on this run."})
    lease_seconds = Integer(metadata={"description": "Send a heartbeat well within this."})
    input_base64 = String(metadata={
        "description": f"The task's configuration file, base64, when it is at most {names.MAX_INLINE_BYTES:,} bytes; "
                       "otherwise absent: "
                       "GET /api/site/runs/{run_id}/input."})
    inline_result_bytes = Integer(metadata={
        "description": "The finish report may carry the output and the log (output_base64, log_base64) when each "
                       "is at most this many bytes; larger ones go by PUT."})
    started = Boolean(metadata={
        "description": "true: the claim started the run (start_pinned): send no start report."})


# How many sessions a site may ask about in one request; it asks about the others in the next.
MAX_SESSIONS_ASKED = 1000


class WholeNumber(Integer):
    """A JSON number that is whole: 5 and 5.0 are 5; "5" and true are refused rather than read as 5 and 1, and
    5.5 rather than cut down to 5."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class SessionIdsIn(Schema):
    session_ids = List(WholeNumber(validate=Range(min=1, max=INT_MAX)), required=True,
                       validate=Length(1, MAX_SESSIONS_ASKED, error=(
                           f"give 1 to {MAX_SESSIONS_ASKED} session ids; ask about the others in another request")),
                       metadata={"description": "Sessions the site holds a /temp folder for."})


class ClosedSessionIdsOut(Schema):
    closed = List(Integer(), metadata={
        "description": "Those of the given sessions that are closed or do not exist (in ascending order): "
                       "the site may remove their /temp."})


class LeaseIn(Schema):
    lease_id = Text(required=True, validate=Length(1, 64))


class StartIn(LeaseIn):
    image_digest = ImageDigest(required=True)


class ParkIn(LeaseIn):
    status = String(required=True, validate=OneOf([str(state) for state in lifecycle.PARKED_STATES]), metadata={
        "description": "awaiting_approval: before it runs, the site's IT officer must approve its image or the "
                       "task; held_for_review: it ended, and its output leaves once the IT officer released it."})
    reason = Text(required=True, validate=Length(1, 2000), metadata={"description": "What it waits for, in words."})
    image_digest = ImageDigest(metadata={
        "description": "The digest the approval is for (awaiting_approval)."})


class ResumedOut(Schema):
    status = String(metadata={"description": "The run's status again: claimed (approved) or running (released)."})
    lease_seconds = Integer(metadata={"description": "The lease runs out this long from now; heartbeats renew it."})


class RefuseIn(LeaseIn):
    reason = Text(required=True, validate=Length(1, 2000))


class FinishIn(LeaseIn):
    exit_code = Integer(allow_none=True, load_default=None, validate=Range(min=-INT_MAX - 1, max=INT_MAX),
                        metadata={"description": "The container's exit code; null if it did not run to its end."})
    failure_reason = Text(allow_none=True, load_default=None, validate=Length(1, 2000),
                            metadata={"description": "Set when the runner, not the algorithm, failed the run."})
    sparql = Nested(SparqlSummary, allow_none=True, load_default=None, metadata={"description": SPARQL_SUMMARY})
    output_base64 = InlineBytes(allow_none=True, load_default=None, metadata={
        "description": "The run's output archive, base64, instead of PUT …/output: for one of at most "
                       "inline_result_bytes (the claim says how many)."})
    log_base64 = InlineBytes(allow_none=True, load_default=None, metadata={
        "description": "The run's log, base64, instead of PUT …/log, within the same bound."})


class DeliveryIn(LeaseIn):
    # The FileService's own rule, for both: the recipient is a folder there, the name a file in it.
    recipient = Text(required=True, validate=Matches(names.FILE_NAME, f"must be {names.FILE_NAME_RULE}"))
    name = Text(required=True, validate=Matches(names.FILE_NAME, f"must be {names.FILE_NAME_RULE}"))
    size = Integer(required=True, validate=Range(min=0, max=2 ** 62))
    sha256 = Sha256(required=True)


class PublicKeyIn(Schema):
    public_key = String(required=True, validate=Matches(AGE_PUBLIC_KEY, error="must be an age public key (age1...)"))


class PublicKeyOut(Schema):
    id = Integer()
    public_key = String()
    created_at = Timestamp()


class SiteIdentityOut(Schema):
    id = Integer()
    name = String(metadata={"description": "The site's name, as the operator registered it."})


class HeartbeatOut(Schema):
    status = String(validate=OneOf(RUN_STATES), metadata={
        "description": "The run's status; 'cancelled' tells the runner to stop it."})


class BlobStoredOut(Schema):
    sha256 = String()
    size = Integer()
