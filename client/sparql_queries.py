"""What the site's SPARQL gateway lets through: pure decisions on one HTTP request, no I/O.

The gateway (sparql_gateway.py) answers the SPARQL 1.1 Protocol's query operation only:
GET with ?query=, POST as a form (query=) or POST with the query as an
application/sparql-query body. A request passes when it carries exactly one query that
rdflib's SPARQL parser reads as SELECT, ASK, CONSTRUCT or DESCRIBE and that has no SERVICE
clause anywhere (SERVICE would make the site's store call other endpoints, a way out).
Updates in any form are refused, and so is anything the parser cannot read: the gateway
forwards only what a real parser has checked, never what a pattern let through.

Two parsers must read the query alike, the gateway's and the store's, or a query that is a
plain SELECT here could be a SERVICE call there (rdflib ends a # comment only at LF,
Oxigraph at CR too; rdflib expands \\uXXXX escapes before parsing, Oxigraph only inside
strings). So the query is first made canonical: line ends LF only, no other control or
line-break characters, codepoint escapes expanded here (as SPARQL says they are, before
parsing) and none left after that; and exactly that text is judged and forwarded. As a
backstop that holds whatever else the parsers disagree on, the word SERVICE may not stand
anywhere in a query as a word of its own.
"""

import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import parse_qs

from pyparsing import ParseException, ParseResults
from rdflib.plugins.sparql import parser as sparql_parser
from rdflib.plugins.sparql.parserutils import CompValue

from common.printable import printable

REFUSED = "refused by this site's SPARQL gateway: "
QUERY_FORMS = {"SelectQuery": "SELECT", "AskQuery": "ASK", "ConstructQuery": "CONSTRUCT", "DescribeQuery": "DESCRIBE"}
# The protocol's dataset parameters are forwarded; anything else (SPARQLWrapper's format=, output=, ...)
# is dropped: the Accept header already says which format the algorithm wants.
DATASET_PARAMETERS = ("default-graph-uri", "named-graph-uri")
FORM_TYPE = "application/x-www-form-urlencoded"
QUERY_TYPE = "application/sparql-query"
UPDATE_TYPE = "application/sparql-update"
MAX_FIELDS = 100
# Characters a store might end a comment or a line at where rdflib does not, and other controls.
_AMBIGUOUS = re.compile("[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")
_CODEPOINT_ESCAPE = re.compile(r"\\u([0-9A-Fa-f]{4})|\\U([0-9A-Fa-f]{8})")
# A store reads SERVICE as the keyword only where no letter joins it to a longer name.
_SERVICE_WORD = re.compile(r"(?<![A-Za-z])service(?![A-Za-z0-9_])", re.IGNORECASE)
VERDICTS_KEPT = 4096

# pyparsing adapts each parse action's arity on its first call, which races when two threads parse at
# once (a TypeError from inside the grammar); parsing is CPU-bound under the GIL anyway, so one at a time.
_PARSING = threading.Lock()
UPDATES_REFUSED = "updates are not allowed; the gateway answers SELECT, ASK, CONSTRUCT and DESCRIBE queries only"


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # starts with REFUSED; shown to the algorithm and recorded


@dataclass(frozen=True)
class QueryRequest:
    """A request that may be forwarded: the query and its dataset parameters."""
    text: str
    form: str  # SELECT, ASK, CONSTRUCT or DESCRIBE
    dataset: tuple  # ((parameter, IRI), ...) in the order given


def refused(status, why):
    # Printable: a reason becomes an HTTP status line and a log line, and may quote a hostile query.
    return Refusal(status, printable(REFUSED + why))



def query_sha256(text_or_bytes):
    data = text_or_bytes.encode("utf-8", "surrogatepass") if isinstance(text_or_bytes, str) else text_or_bytes
    return hashlib.sha256(data).hexdigest()


def read_request(method, query_string, content_type, body, max_query_bytes, parse=None):
    """The request as a QueryRequest, or the Refusal to answer it with.

    body is the POST body (b"" for GET); its size was checked against max_query_bytes before it was read.
    parse: what reads a query not judged before (parsed_verdict, or a ParserPool's judge with a time limit).
    Returns (QueryRequest or None, Refusal or None, the query text if one was found).
    """
    text, parameters, refusal = unpack_request(method, query_string, content_type, body)
    if refusal:
        return None, refusal, text
    if len(text.encode("utf-8", "surrogatepass")) > max_query_bytes:
        return None, refused(413, f"the query is longer than this site's limit of {max_query_bytes} bytes"), text
    text, refusal = canonical_query(text)
    if refusal:
        return None, refusal, text
    form, refusal = judge_query(text, parse or parsed_verdict)
    if refusal:
        return None, refusal, text
    dataset = tuple((name, iri) for name in DATASET_PARAMETERS for iri in parameters.get(name, []))
    return QueryRequest(text, form, dataset), None, text


def unpack_request(method, query_string, content_type, body):
    """(the query text, all parameters, None), or (text or None, parameters or None, Refusal): the SPARQL
    Protocol's envelope only, nothing parsed yet, so it is cheap enough for any request."""
    if method not in ("GET", "POST"):
        return None, None, refused(405, f"{method} is not a SPARQL query; send the query with GET or POST")
    try:
        parameters = parse_qs(query_string, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
        text = None
        if method == "POST":
            media_type = (content_type or "").split(";")[0].strip().lower()
            if media_type == UPDATE_TYPE:
                return None, None, refused(403, UPDATES_REFUSED)
            if media_type == FORM_TYPE:
                for name, values in parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict",
                                             max_num_fields=MAX_FIELDS).items():
                    parameters.setdefault(name, []).extend(values)
            elif media_type == QUERY_TYPE:
                text = body.decode("utf-8")
            else:
                return None, None, refused(415, f"POST the query as {FORM_TYPE} (query=...) or as {QUERY_TYPE}, "
                                                f"not {media_type or 'a body without Content-Type'}")
        if sum(len(values) for values in parameters.values()) > MAX_FIELDS:
            raise ValueError("too many parameters")
    except UnicodeDecodeError:
        return None, None, refused(400, "the request is not valid UTF-8 (percent-encode the query as UTF-8)")
    except ValueError:
        return None, None, refused(400, f"the request has more than {MAX_FIELDS} parameters")
    if "update" in parameters:
        return None, None, refused(403, UPDATES_REFUSED)
    if text is None:
        texts = parameters.get("query", [])
        if len(texts) != 1:
            return None, None, refused(400, f"give exactly one query parameter, not {len(texts)}")
        text = texts[0]
    return text, parameters, None


def canonical_query(text):
    """(the text any SPARQL parser reads alike, None), or (the text, Refusal): see the module's docstring."""
    text = text.replace("\r\n", "\n")
    if _AMBIGUOUS.search(text):
        return text, refused(400, "line breaks other than LF or CRLF, and other control characters, are not "
                                  "accepted in a query (write them as \\n or \\t escapes inside strings)")
    try:
        expanded = _CODEPOINT_ESCAPE.sub(_character, text)
    except ValueError as error:
        return text, refused(400, str(error))
    if _CODEPOINT_ESCAPE.search(expanded) or _AMBIGUOUS.search(expanded):
        return text, refused(400, "a \\u or \\U escape may not make another escape or a control character")
    if _SERVICE_WORD.search(expanded):
        return text, refused(403, "the word SERVICE may not stand anywhere in a query, not even in a string, an "
                                  "IRI, a variable's name or a comment, so no store can be made to call another "
                                  "endpoint; rename the variable, or build such a string with CONCAT")
    return expanded, None


def _character(escape):
    code = int(escape[1] or escape[2], 16)
    if 0xD800 <= code <= 0xDFFF or code > 0x10FFFF:
        raise ValueError(f"the escape {escape[0]} names no character")
    return chr(code)


_verdicts = OrderedDict()  # sha256 of a canonical query -> (form, refusal), the newest last
_verdicts_lock = threading.Lock()


def judge_query(text, parse):
    """(form, None) for a canonical query the gateway forwards, or (None, Refusal).

    Kept by the query's sha256 (not its text, which may be long): parsing costs milliseconds, and
    iterative algorithms send the same queries round after round.
    """
    key = query_sha256(text)
    with _verdicts_lock:
        if key in _verdicts:
            _verdicts.move_to_end(key)
            return _verdicts[key]
    verdict = parse(text)
    with _verdicts_lock:
        _verdicts[key] = verdict
        if len(_verdicts) > VERDICTS_KEPT:
            _verdicts.popitem(last=False)
    return verdict


def parsed_verdict(text):
    """(form, None) or (None, Refusal) as rdflib's parser reads a canonical query."""
    try:
        with _PARSING:
            tree = sparql_parser.parseQuery(text)
    except (ParseException, RecursionError, ValueError) as error:
        if _is_update(text):
            return None, refused(403, UPDATES_REFUSED)
        where = f" at line {error.lineno}, column {error.col}" if isinstance(error, ParseException) else ""
        return None, refused(400, f"not a SPARQL query{where}: {_first_line(error)}")
    names = _node_names(tree)
    if "ServiceGraphPattern" in names:
        return None, refused(403, "SERVICE is not allowed: queries may read this site's data only, "
                                  "not make its store call other endpoints")
    form = next((QUERY_FORMS[name] for name in _query_node_names(tree) if name in QUERY_FORMS), None)
    if form is None:
        return None, refused(400, "not a SELECT, ASK, CONSTRUCT or DESCRIBE query")
    return form, None


def _is_update(text):
    try:
        with _PARSING:
            sparql_parser.parseUpdate(text)
        return True
    except (ParseException, RecursionError, ValueError):
        return False


def _query_node_names(tree):
    return [node.name for node in tree if isinstance(node, CompValue)]


def _node_names(tree):
    """The name of every node in the parse tree, however deeply nested (subqueries, FILTER EXISTS, ...)."""
    names, pending = set(), [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, CompValue):
            names.add(node.name)
            pending.extend(node.values())
        elif isinstance(node, (list, tuple, ParseResults)):
            pending.extend(node)
    return names


def _first_line(error):
    return str(error).splitlines()[0][:300] if str(error) else type(error).__name__
