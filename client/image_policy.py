"""Which images this site runs: parsing image references and checking them against the whitelist.

Pure decisions, no I/O. A whitelist entry is a regular expression that must match
the *whole* reference (re.fullmatch), either as the task wrote it or in its
normalised form, so `myconsortium/.*` cannot be satisfied by `evil.io/myconsortium/x`
or by `myconsortium/x` hidden inside a longer name.

A whole match is not a tight one: `127\\.0\\.0\\.1:5050/pht/.*` also admits `127.0.0.1:5050/pht/evil/x`,
which anyone allowed to push below pht/ can publish. overbroad_patterns finds such entries, for the
runner to warn of at start and whenever it takes up its config again.
"""

import re
import re._constants as regex_constants
import re._parser as regex_parser
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # what a reference pins an image to, and what a site approves

# Docker's reference grammar (distribution/reference), without the rarely used IPv6 hosts.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?:(?P<domain>[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?)/)?"
    rf"(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    rf"(?:@(?P<digest>{DIGEST.pattern}))?")


class InvalidReference(ValueError):
    pass


@dataclass(frozen=True)
class ImageReference:
    written: str
    registry: str
    repository: str  # path within the registry, e.g. library/ubuntu
    tag: str | None
    digest: str | None

    @property
    def name(self):
        """registry/repository: what `docker pull` needs before the tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def normalised(self):
        """registry/repository:tag, with @digest when the reference gave one."""
        if self.digest:
            tag = f":{self.tag}" if self.tag else ""
            return f"{self.name}{tag}@{self.digest}"
        return f"{self.name}:{self.tag or 'latest'}"

    @property
    def pull_reference(self):
        """A digest wins over a tag: it names exactly one image."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag or 'latest'}"


def parse_image_reference(written):
    match = _REFERENCE.fullmatch(written)
    if not match:
        raise InvalidReference(f"{written!r} is not a valid image reference")
    domain, path = match["domain"], match["path"]
    # Like Docker: the first component is a registry only if it looks like a host name.
    if domain is not None and not ("." in domain or ":" in domain or domain == "localhost"):
        if domain != domain.lower():
            raise InvalidReference(f"{written!r} is not a valid image reference (repository names are lowercase)")
        path = f"{domain}/{path}"
        domain = None
    registry = domain or DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    return ImageReference(written, registry, path, match["tag"], match["digest"])


def refusal_reason(written, whitelist, require_digest=False):
    """None if the site may run this image, else the reason it may not (pure)."""
    try:
        reference = parse_image_reference(written)
    except InvalidReference as error:
        return str(error)
    if not any(pattern.fullmatch(written) or pattern.fullmatch(reference.normalised) for pattern in whitelist):
        return f"image {written!r} (normalised {reference.normalised!r}) matches no entry of this site's whitelist"
    if require_digest and reference.digest is None:
        # A tag can be moved to another image after the task was posted; a digest names one image for good.
        return (f"this site runs only images pinned by digest (@sha256:...); {written!r} names only a tag: post "
                "the task with the researcher library or CLI, which pin the tag, or give name:tag@sha256:...")
    return None


# --- whitelist patterns that admit more than a site means ------------------------------------------------------

FOREIGN_HOST = "attacker.invalid"  # a registry no site trusts (.invalid never resolves)
NESTED_SEGMENT = "someone-else"  # a path segment no site names in its whitelist
MAX_EXAMPLES = 64  # references made up per pattern, to probe around
MAX_EXAMPLE_REPEATS = 200  # a pattern asking for more of something (x{1000}) gets no examples from that part
# No made-up reference is longer than a claim's image may be (client/claim.py): nested repeats, ((x{200}){200}){200},
# would otherwise make one of gigabytes.
MAX_EXAMPLE_CHARS = 512
# The characters a made-up reference takes where a pattern allows several, most name-like first.
_PREFERRED_CHARACTERS = "xa0-._:/@"
_CATEGORIES = {regex_constants.CATEGORY_DIGIT: re.compile(r"\d"), regex_constants.CATEGORY_NOT_DIGIT: re.compile(r"\D"),
               regex_constants.CATEGORY_SPACE: re.compile(r"\s"), regex_constants.CATEGORY_NOT_SPACE: re.compile(r"\S"),
               regex_constants.CATEGORY_WORD: re.compile(r"\w"), regex_constants.CATEGORY_NOT_WORD: re.compile(r"\W")}


def overbroad_patterns(patterns):
    """Whitelist patterns that admit images a site would not mean to run: [(pattern, why)], the why naming an
    image the pattern admits and the fix (pure).

    Each pattern is probed with references made up around images it admits (made up from the pattern itself):
    the same repository on a registry nobody trusts, on a host that differs from the written one in a single
    character where the pattern has an unescaped `.`, and with a path segment added (`pht/someone-else/x` where
    `pht/x` is admitted). Whether a probe is admitted is refusal_reason's decision, the one every claim gets, so
    each warning comes with an image the site would really run; tight patterns, which only wildcards could make
    admit such a probe, get none."""
    found = []
    for pattern in patterns:
        pattern = re.compile(pattern)
        why = _overbroad_reason(pattern)
        if why:
            found.append((pattern.pattern, why))
    return found


def _overbroad_reason(pattern):
    def admitted(reference):
        return refusal_reason(reference, [pattern]) is None

    examples = [parse_image_reference(text) for text in _examples(pattern) if admitted(text)]
    for probe in (probe for example in examples for probe in _on_foreign_host(example)):
        if admitted(probe):
            return (f"admits images from any registry, such as {probe}: begin it with the host of the registry you "
                    "trust, its dots escaped (registry\\.example\\.org/...)")
    for probe in (probe for example in examples for probe in _look_alike_hosts(example)):
        if admitted(probe):
            return (f"admits look-alike registries, such as {probe}: an unescaped . matches any character; escape "
                    "the dots of the host (\\. in the pattern, \\\\. in config.json)")
    for example in examples:
        for trusted, probe in _nested(example):
            if not admitted(probe):
                continue
            if _host_written(example) and trusted == f"{example.registry}/":
                return (f"admits any repository on {example.registry}, nested ones too, such as {probe}: whoever may "
                        "push anything there can run code at this site; name the repositories you trust")
            return (f"admits repositories nested below {trusted}, such as {probe}: whoever may push there can run "
                    "code at this site; name each repository, or let one path segment vary ([a-z0-9-]+, not .*)")
    return None


def _host_written(reference):
    """Whether the reference as written begins with its registry's host (else Docker Hub is implied)."""
    return reference.written.startswith(f"{reference.registry}/")


def _on_foreign_host(reference):
    """The reference on a registry nobody trusts: its host replaced, or put before it, or in place of its first
    segment (which a pattern like [a-z.]+/pht/x meant as a host)."""
    written = reference.written
    if _host_written(reference):
        return [FOREIGN_HOST + written[len(reference.registry):]]
    return [f"{FOREIGN_HOST}/{written}"] + ([f"{FOREIGN_HOST}/{written.split('/', 1)[1]}"] if "/" in written else [])


def _look_alike_hosts(reference):
    """The reference on hosts that differ from its own in one dot: registryxexample.org for registry.example.org."""
    if not _host_written(reference):
        return []
    host = reference.registry.split(":", 1)[0]
    rest = reference.written[len(host):]
    return [f"{host[:index]}x{host[index + 1:]}{rest}" for index, char in enumerate(host) if char == "."]


def _nested(reference):
    """(trusted prefix, the reference with a path segment added there): after each / of its name, and at its end."""
    written = reference.written
    name_length = len(written) - len(f":{reference.tag}" if reference.tag else "") - len(
        f"@{reference.digest}" if reference.digest else "")
    name, ending = written[:name_length], written[name_length:]
    nested = [(name[:index + 1], f"{name[:index + 1]}{NESTED_SEGMENT}/{name[index + 1:]}{ending}")
              for index, char in enumerate(name) if char == "/"]
    return nested + [(f"{name}/", f"{name}/{NESTED_SEGMENT}{ending}")]


def _examples(pattern):
    """Strings made up to match the pattern, wildcards filled with a letter or left empty (some may not match:
    refusal_reason decides). Read with Python's own parser of its regular expressions (re._parser, private but the
    only one there is): should it change, examples are missed, never made up wrongly, since every probe is checked
    with re itself."""
    made = _examples_of(regex_parser.parse(pattern.pattern, pattern.flags))
    # Repository names are lowercase: (?i)REGISTRY/PHT/.* admits them in lowercase only.
    return list(dict.fromkeys(made + [example.lower() for example in made]))


def _examples_of(items):
    made = [""]
    for operation, argument in items:
        made = [head + tail for head in made for tail in _choices(operation, argument)
                if len(head) + len(tail) <= MAX_EXAMPLE_CHARS][:MAX_EXAMPLES]
    return made


def _choices(operation, argument):
    """What one parsed item of a pattern may stand for, in examples."""
    if operation is regex_constants.LITERAL:
        return [chr(argument)]
    if operation is regex_constants.NOT_LITERAL:
        return [next(char for char in _PREFERRED_CHARACTERS if ord(char) != argument)]
    if operation is regex_constants.ANY:
        return [".", "x"]  # a dot first: registry.example.org/... written without escaping its dots
    if operation is regex_constants.IN:
        return [char for char in _PREFERRED_CHARACTERS if _in_class(char, argument)][:1]
    if operation is regex_constants.BRANCH:
        return [example for branch in argument[1] for example in _examples_of(branch)][:MAX_EXAMPLES]
    if operation is regex_constants.SUBPATTERN:
        return _examples_of(argument[-1])
    if operation is regex_constants.ATOMIC_GROUP:
        return _examples_of(argument)
    if operation in (regex_constants.MAX_REPEAT, regex_constants.MIN_REPEAT, regex_constants.POSSESSIVE_REPEAT):
        least, most, repeated = argument
        if least > MAX_EXAMPLE_REPEATS:
            return []
        once = _examples_of(repeated)
        counts = sorted({least, min(max(least, 1), most)})
        return [example * count for count in counts for example in once
                if len(example) * count <= MAX_EXAMPLE_CHARS][:MAX_EXAMPLES]
    return [""]  # anchors, look-arounds, back-references: the probe's fullmatch decides


def _in_class(char, items):
    negated = bool(items) and items[0][0] is regex_constants.NEGATE
    member = False
    for operation, argument in items:
        if operation is regex_constants.LITERAL:
            member = member or ord(char) == argument
        elif operation is regex_constants.RANGE:
            member = member or argument[0] <= ord(char) <= argument[1]
        elif operation is regex_constants.CATEGORY:
            category = _CATEGORIES.get(argument)
            member = member or bool(category and category.fullmatch(char))
    return member != negated
