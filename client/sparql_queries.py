"""What the site's SPARQL gateway lets through: pure decisions on one HTTP request, no I/O.

The gateway (sparql_gateway.py) answers the SPARQL 1.1 Protocol's query operation only:
GET with ?query=, POST as a form (query=) or POST with the query as an
application/sparql-query body. A request passes when it carries exactly one query that
rdflib's SPARQL parser reads as SELECT, ASK, CONSTRUCT or DESCRIBE and that has no SERVICE
clause anywhere (SERVICE would make the site's store call other endpoints, a way out).
Updates in any form are refused, and so is anything the parser cannot read: the gateway
forwards only what a real parser has checked, never what a pattern let through.

rdflib's parser expands \\uXXXX escapes before it parses, which Oxigraph does not: so it
sees SERVICE wherever a store could, and refuses more rather than less.
"""

import functools
import hashlib
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs

from pyparsing import ParseException, ParseResults
from rdflib.plugins.sparql import parser as sparql_parser
from rdflib.plugins.sparql.parserutils import CompValue

from client.printable import printable

REFUSED = "refused by this site's SPARQL gateway: "
QUERY_FORMS = {"SelectQuery": "SELECT", "AskQuery": "ASK", "ConstructQuery": "CONSTRUCT", "DescribeQuery": "DESCRIBE"}
# The protocol's dataset parameters are forwarded; anything else (SPARQLWrapper's format=, output=, ...)
# is dropped: the Accept header already says which format the algorithm wants.
DATASET_PARAMETERS = ("default-graph-uri", "named-graph-uri")
FORM_TYPE = "application/x-www-form-urlencoded"
QUERY_TYPE = "application/sparql-query"
UPDATE_TYPE = "application/sparql-update"
MAX_FIELDS = 100
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


def read_request(method, query_string, content_type, body, max_query_bytes):
    """The request as a QueryRequest, or the Refusal to answer it with.

    body is the POST body (b"" for GET); its size was checked against max_query_bytes before it was read.
    Returns (QueryRequest or None, Refusal or None, the query text if one was found).
    """
    if method not in ("GET", "POST"):
        return None, refused(405, f"{method} is not a SPARQL query; send the query with GET or POST"), None
    try:
        parameters = parse_qs(query_string, keep_blank_values=True, errors="strict", max_num_fields=MAX_FIELDS)
        text = None
        if method == "POST":
            media_type = (content_type or "").split(";")[0].strip().lower()
            if media_type == UPDATE_TYPE:
                return None, refused(403, UPDATES_REFUSED), None
            if media_type == FORM_TYPE:
                for name, values in parse_qs(body.decode("utf-8"), keep_blank_values=True, errors="strict",
                                             max_num_fields=MAX_FIELDS).items():
                    parameters.setdefault(name, []).extend(values)
            elif media_type == QUERY_TYPE:
                text = body.decode("utf-8")
            else:
                return None, refused(415, f"POST the query as {FORM_TYPE} (query=...) or as {QUERY_TYPE}, "
                                          f"not {media_type or 'a body without Content-Type'}"), None
    except UnicodeDecodeError:
        return None, refused(400, "the request is not valid UTF-8 (percent-encode the query as UTF-8)"), None
    except ValueError:
        return None, refused(400, f"the request has more than {MAX_FIELDS} parameters"), None
    if "update" in parameters:
        return None, refused(403, UPDATES_REFUSED), None
    if text is None:
        texts = parameters.get("query", [])
        if len(texts) != 1:
            return None, refused(400, f"give exactly one query parameter, not {len(texts)}"), None
        text = texts[0]
    if len(text.encode("utf-8", "surrogatepass")) > max_query_bytes:
        return None, refused(413, f"the query is longer than this site's limit of {max_query_bytes} bytes"), text
    form, refusal = judge_query(text)
    if refusal:
        return None, refusal, text
    dataset = tuple((name, iri) for name in DATASET_PARAMETERS for iri in parameters.get(name, []))
    return QueryRequest(text, form, dataset), None, text


@functools.lru_cache(maxsize=1024)
def judge_query(text):
    """(form, None) for a query the gateway forwards, or (None, Refusal).

    Cached by text: parsing costs milliseconds, and iterative algorithms send the same queries round after round.
    """
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
