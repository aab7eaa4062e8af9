"""What the SPARQL gateway lets through, decided without servers (client/sparql_queries.py).

Every request form of the SPARQL 1.1 Protocol's query operation passes with its query and its
dataset; updates in every form, SERVICE anywhere in a query, and everything that is not one
readable query are refused with their own status. What is forwarded is the canonical text, the
one rdflib and Oxigraph read alike. A refusal's reason is printable ASCII, since it becomes an
HTTP status line and a log line, whatever the request held.
"""

from urllib.parse import quote, urlencode

import pytest

from client.sparql_parsing import ParserPool
from client.sparql_queries import (MAX_FIELDS, REFUSED, QueryRequest, canonical_query, judge_query, parsed_verdict,
                                   query_sha256, read_request)

LIMIT = 10_000
FORM_TYPE = "application/x-www-form-urlencoded"
QUERY_TYPE = "application/sparql-query"
SELECT = "SELECT ?s WHERE { ?s ?p ?o }"
QUERIES = {
    "SELECT": SELECT,
    "ASK": "ASK { ?s ?p ?o }",
    "CONSTRUCT": "CONSTRUCT { ?s ?p ?o } WHERE { ?s ?p ?o }",
    "DESCRIBE": "DESCRIBE <http://example.org/p/1>",
}
# The other endpoint a SERVICE clause would make the site's store call.
ELSEWHERE = "<http://127.0.0.1:9/sparql>"


def get(query_string):
    return read_request("GET", query_string, None, b"", LIMIT)


def post_form(fields, query_string="", content_type=FORM_TYPE):
    body = fields if isinstance(fields, bytes) else urlencode(fields).encode()
    return read_request("POST", query_string, content_type, body, LIMIT)


def post_query(text, query_string="", content_type=QUERY_TYPE):
    body = text if isinstance(text, bytes) else text.encode()
    return read_request("POST", query_string, content_type, body, LIMIT)


def judged(text):
    """(form, None) or (None, Refusal): the whole decision on a query's text, as the gateway makes it."""
    query, refusal, _text = read_request("POST", "", QUERY_TYPE, text.encode("utf-8", "surrogatepass"), 10 ** 7)
    return (query.form if query else None), refusal


def in_every_form(text):
    """The same query sent the protocol's three ways: GET, POST form, POST application/sparql-query."""
    return {"GET": get(urlencode({"query": text})), "POST form": post_form({"query": text}),
            "POST query": post_query(text)}


def refusal_of(result):
    query, refusal, _text = result
    assert query is None, f"{query} passed"
    return refusal


def assert_refused(result, status, *words):
    refusal = refusal_of(result)
    assert refusal.status == status, refusal
    assert refusal.reason.startswith(REFUSED)
    for word in words:
        assert word in refusal.reason


# --- what passes -------------------------------------------------------------------------

@pytest.mark.parametrize("form", QUERIES)
def test_each_query_form_passes_in_each_request_form(form):
    for how, (query, refusal, text) in in_every_form(QUERIES[form]).items():
        assert refusal is None, (how, refusal)
        assert query == QueryRequest(QUERIES[form], form, ()), how
        assert text == QUERIES[form]


@pytest.mark.parametrize("text, form", [
    ("select * where { ?s ?p ?o }", "SELECT"),
    ("PREFIX ex: <http://example.org/>\nBASE <http://example.org/>\nSELECT (COUNT(*) AS ?n) { ?s a ex:P }",
     "SELECT"),
    ("# a comment first\nASK {}", "ASK"),
    ("CONSTRUCT WHERE { ?s ?p ?o }", "CONSTRUCT"),
    ("DESCRIBE ?s WHERE { ?s ?p ?o } LIMIT 1", "DESCRIBE"),
    ("SELECT ?s WHERE { { SELECT ?s WHERE { ?s ?p ?o } LIMIT 3 } FILTER NOT EXISTS { ?s a ?t } }", "SELECT"),
    ("SELECT ?é WHERE { ?s ?p ?é }", "SELECT"),
])
def test_queries_pass_with_their_form(text, form):
    assert judged(text) == (form, None)
    assert parsed_verdict(text) == (form, None)


@pytest.fixture(scope="module")
def parser_pool():
    """The runner's parser: worker processes with a deep stack and a time limit (client/sparql_parsing.py)."""
    pool = ParserPool(parse_seconds=5)
    pool.start()
    yield pool
    pool.close()


def test_a_long_flat_query_passes(parser_pool):
    # 120 triple patterns, nothing nested: a wide cohort query, not an attack.
    text = "SELECT * WHERE { " + "".join(f"?patient <http://example.org/v{i}> ?v{i} . " for i in range(120)) + "}"
    assert parser_pool.judge(text) == ("SELECT", None)
    # Nesting two thousand deep is still refused, never a crash of the worker.
    assert parser_pool.judge("SELECT * WHERE " + "{ " * 2000 + "?s ?p ?o" + " }" * 2000)[1].status == 400


def test_a_query_too_slow_to_read_is_refused_and_the_next_one_is_read(parser_pool):
    # A long || chain: valid SPARQL that takes rdflib far longer than the limit to parse.
    slow = "SELECT * WHERE { ?s ?p ?o FILTER(" + " || ".join(f"?o = {n}" for n in range(4000)) + ") }"
    form, refusal = parser_pool.judge(slow)
    assert form is None and refusal.status == 400 and "longer than this site allows (5 s)" in refusal.reason
    assert parser_pool.judge("ASK { ?s ?p 1 }") == ("ASK", None)  # its worker was replaced


def test_get_keeps_the_dataset_and_drops_what_sparqlwrapper_adds():
    query_string = urlencode([("query", SELECT), ("format", "json"), ("output", "json"), ("results", "json"),
                              ("default-graph-uri", "http://g/1"), ("named-graph-uri", "http://g/2"),
                              ("default-graph-uri", "http://g/3"), ("timeout", "0")])
    query, refusal, _ = get(query_string)
    assert refusal is None
    assert query == QueryRequest(SELECT, "SELECT", (("default-graph-uri", "http://g/1"),
                                                    ("default-graph-uri", "http://g/3"),
                                                    ("named-graph-uri", "http://g/2")))


def test_form_post_keeps_the_dataset_from_the_url_and_the_body():
    query, refusal, _ = post_form([("query", SELECT), ("format", "json"), ("named-graph-uri", "http://g/2")],
                                  query_string=urlencode({"default-graph-uri": "http://g/1", "output": "json"}),
                                  content_type="Application/X-WWW-Form-Urlencoded; charset=UTF-8")
    assert refusal is None
    assert query == QueryRequest(SELECT, "SELECT", (("default-graph-uri", "http://g/1"),
                                                    ("named-graph-uri", "http://g/2")))


def test_direct_post_takes_the_body_and_the_dataset_from_the_url():
    # A query= in the URL of a direct POST is not what is forwarded: the body is.
    query_string = urlencode({"default-graph-uri": "http://g/1", "format": "json",
                              "query": f"SELECT * WHERE {{ SERVICE {ELSEWHERE} {{ ?s ?p ?o }} }}"})
    query, refusal, _ = post_query(SELECT, query_string, content_type="application/sparql-query; charset=utf-8")
    assert refusal is None
    assert query == QueryRequest(SELECT, "SELECT", (("default-graph-uri", "http://g/1"),))


def test_plus_and_percent_encoding_both_decode():
    assert get("query=" + quote(SELECT))[0].text == SELECT
    assert get("query=" + quote(SELECT).replace("%20", "+"))[0].text == SELECT


@pytest.mark.parametrize("text", [
    "SELECT * WHERE { ?s ?p 'INSERT DATA { <a> <b> <c> }' }",
    'SELECT * WHERE { ?s ?p """DROP ALL ;\nLOAD <http://127.0.0.1:9/> ; CLEAR ALL""" }',
    "SELECT * WHERE { ?s <http://example.org/update> ?o }",
    "SELECT * WHERE { ?s <http://example.org/services/delete> ?o }",
    "PREFIX load: <http://example.org/load#> SELECT * WHERE { ?s load:insert ?o }",
    "SELECT ?update ?insert ?services ?service_date ?service2 ?selfservice WHERE { ?update ?insert ?services }",
    "SELECT * WHERE { ?s ?p ?o } # INSERT DATA { <a> <b> <c> }\n",
])
def test_update_keywords_inside_literals_iris_names_and_comments_are_not_refusals(text):
    assert judged(text) == ("SELECT", None)


@pytest.mark.parametrize("text", [
    'SELECT * WHERE { ?s ?p "SERVICE" }',
    'SELECT * WHERE { ?s ?p "self-service" }',
    "SELECT * WHERE { ?s <http://example.org/SERVICE> ?o }",
    "SELECT * WHERE { ?s <http://example.org/\\u0053ERVICE> ?o }",
    "PREFIX ex: <http://example.org/> SELECT * WHERE { ?s ex:service ?o }",
    "SELECT ?service WHERE { ?service ?p ?o }",
    "SELECT * WHERE { ?s ?p ?o } # SERVICE <http://127.0.0.1:9/> { }\n",
])
def test_the_word_service_is_refused_even_where_no_parser_reads_a_keyword(text):
    # The module's backstop: whatever else two parsers disagree on, the word alone cannot pass.
    form, refusal = judged(text)
    assert (form, refusal.status) == (None, 403), refusal
    assert "SERVICE" in refusal.reason


# --- updates: 403 in every form ------------------------------------------------------------

UPDATES = [
    "INSERT DATA { <http://example.org/s> <http://example.org/p> 1 }",
    "DELETE DATA { <http://example.org/s> <http://example.org/p> 1 }",
    "DELETE WHERE { ?s ?p ?o }",
    "INSERT { ?s ?p 2 } WHERE { ?s ?p ?o }",
    "WITH <http://g/1> DELETE { ?s ?p ?o } INSERT { ?s ?p 3 } WHERE { ?s ?p ?o }",
    "LOAD <http://127.0.0.1:9/data.nt>",
    "LOAD SILENT <http://127.0.0.1:9/data.nt> INTO GRAPH <http://g/1>",
    "CLEAR ALL",
    "CLEAR DEFAULT",
    "DROP ALL",
    "DROP GRAPH <http://g/1>",
    "CREATE GRAPH <http://g/1>",
    "ADD DEFAULT TO <http://g/1>",
    "MOVE DEFAULT TO <http://g/1>",
    "COPY DEFAULT TO <http://g/1>",
    "PREFIX ex: <http://example.org/> insert data { ex:s ex:p 1 } ; drop all",
]


@pytest.mark.parametrize("update", UPDATES)
def test_an_update_sent_as_a_query_is_refused_in_every_form(update):
    for how, result in in_every_form(update).items():
        refusal = refusal_of(result)
        assert refusal.status == 403, (how, refusal)
        assert "updates are not allowed" in refusal.reason


@pytest.mark.parametrize("result", [
    get(urlencode({"update": UPDATES[0]})),
    get(urlencode({"update": UPDATES[0], "query": SELECT})),
    get(urlencode({"query": SELECT, "update": ""})),
    post_form({"update": UPDATES[0]}),
    post_form({"query": SELECT}, query_string=urlencode({"update": UPDATES[0]})),
    post_query(SELECT, query_string=urlencode({"update": UPDATES[0]})),
    post_query(UPDATES[0], content_type="application/sparql-update"),
    post_query(SELECT, content_type="Application/SPARQL-Update; charset=utf-8"),
], ids=["GET update=", "GET update= and query=", "GET empty update=", "POST form update=",
        "POST form, update= in the URL", "POST query, update= in the URL", "POST sparql-update",
        "POST sparql-update with a SELECT"])
def test_the_protocols_update_operation_is_refused(result):
    assert_refused(result, 403, "updates are not allowed")


# --- SERVICE: 403 wherever it is -----------------------------------------------------------

PATTERN = "{ ?a ?b ?c }"
SERVICES = {
    "top level": f"SELECT * WHERE {{ SERVICE {ELSEWHERE} {PATTERN} }}",
    "after a triple": f"SELECT * WHERE {{ ?s ?p ?o . SERVICE {ELSEWHERE} {PATTERN} }}",
    "in OPTIONAL": f"SELECT * WHERE {{ ?s ?p ?o OPTIONAL {{ ?s ?p ?o OPTIONAL {{ SERVICE {ELSEWHERE} {PATTERN} }} }} "
                   "}",
    "in UNION": f"SELECT * WHERE {{ {{ ?s ?p ?o }} UNION {{ SERVICE {ELSEWHERE} {PATTERN} }} }}",
    "in a subquery": f"SELECT * WHERE {{ {{ SELECT ?a WHERE {{ SERVICE {ELSEWHERE} {PATTERN} }} }} }}",
    "in FILTER EXISTS": f"SELECT * WHERE {{ ?s ?p ?o FILTER EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }} }}",
    "in FILTER NOT EXISTS": f"SELECT * WHERE {{ ?s ?p ?o FILTER NOT EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }} }}",
    "in MINUS": f"SELECT * WHERE {{ ?s ?p ?o MINUS {{ SERVICE {ELSEWHERE} {PATTERN} }} }}",
    "in GRAPH": f"SELECT * WHERE {{ GRAPH ?g {{ SERVICE {ELSEWHERE} {PATTERN} }} }}",
    "in BIND EXISTS": f"SELECT * WHERE {{ BIND(EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }} AS ?x) }}",
    "in a projection": f"SELECT (EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }} AS ?x) WHERE {{ }}",
    "in ORDER BY": f"SELECT * WHERE {{ ?s ?p ?o }} ORDER BY (EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }})",
    "in HAVING": f"SELECT ?s WHERE {{ ?s ?p ?o }} GROUP BY ?s HAVING (EXISTS {{ SERVICE {ELSEWHERE} {PATTERN} }})",
    "SILENT": f"SELECT * WHERE {{ SERVICE SILENT {ELSEWHERE} {PATTERN} }}",
    "lowercase": f"select * where {{ service {ELSEWHERE} {PATTERN} }}",
    "mixed case": f"SELECT * WHERE {{ SeRvIcE sIlEnT {ELSEWHERE} {PATTERN} }}",
    "a variable as the service": f"SELECT * WHERE {{ VALUES ?x {{ {ELSEWHERE} }} SERVICE ?x {PATTERN} }}",
    "a prefixed name as the service": f"PREFIX e: <http://127.0.0.1:9/> SELECT * WHERE {{ SERVICE e:sparql "
                                      f"{PATTERN} }}",
    "\\u0053 for the S": f"SELECT * WHERE {{ \\u0053ERVICE {ELSEWHERE} {PATTERN} }}",
    "\\U00000053 for the S": f"SELECT * WHERE {{ \\U00000053ERVICE {ELSEWHERE} {PATTERN} }}",
    "every letter escaped": "SELECT * WHERE { " + "".join(f"\\u{ord(c):04X}" for c in "service")
                            + f" {ELSEWHERE} {PATTERN} }}",
    "after a comment": f"SELECT * WHERE {{ ?s ?p ?o # a comment\n SERVICE {ELSEWHERE} {PATTERN} }}",
    "in ASK": f"ASK {{ SERVICE {ELSEWHERE} {PATTERN} }}",
    "in CONSTRUCT": f"CONSTRUCT {{ ?a ?b ?c }} WHERE {{ SERVICE {ELSEWHERE} {PATTERN} }}",
    "in DESCRIBE": f"DESCRIBE ?a WHERE {{ SERVICE {ELSEWHERE} {PATTERN} }}",
}


@pytest.mark.parametrize("text", SERVICES.values(), ids=SERVICES.keys())
def test_service_is_refused_wherever_it_is(text):
    form, refusal = judged(text)
    assert form is None
    assert refusal.status == 403, refusal
    assert "SERVICE" in refusal.reason


@pytest.mark.parametrize("text", SERVICES.values(), ids=SERVICES.keys())
def test_the_parser_alone_finds_service_wherever_it_is(text):
    # Without the word backstop: rdflib's parse tree has each SERVICE clause, however deep.
    form, refusal = parsed_verdict(text)
    assert (form, refusal.status) == (None, 403), refusal
    assert "SERVICE is not allowed" in refusal.reason


def test_service_is_refused_in_every_request_form():
    for how, result in in_every_form(SERVICES["in a subquery"]).items():
        assert refusal_of(result).status == 403, how


# Texts where rdflib and Oxigraph (0.5) disagree on what is code. Each was run against a real
# Oxigraph (`oxigraph query`): it called the SERVICE endpoint, while rdflib alone saw no SERVICE.
# The gateway must refuse them, or SERVICE is a way out.
DISAGREEMENTS = {
    # SPARQL ends a comment at \r or \n; rdflib's `"#" + rest_of_line` runs to \n only, so it reads
    # the SERVICE after the \r as part of the comment.
    "a comment ended by \\r": f"SELECT * WHERE {{ ?s ?p ?o # note\r SERVICE {ELSEWHERE} {PATTERN} \n}}",
    # rdflib replaces \u0022 by a quote before it parses, so '"\u0022"' opens a long string
    # ("""...""") that swallows the SERVICE; Oxigraph reads '"\u0022"' as a string holding one quote.
    "\\u0022 in strings": f'SELECT * WHERE {{ {{ BIND("\\u0022" AS ?x) }} UNION {{ SERVICE {ELSEWHERE} {PATTERN} }} '
                          f'UNION {{ BIND("\\u0022" AS ?y) }} }}',
    # The same with \u0027 in '...' strings.
    "\\u0027 in strings": f"SELECT * WHERE {{ {{ BIND('\\u0027' AS ?x) }} UNION {{ SERVICE {ELSEWHERE} {PATTERN} }} "
                          f"UNION {{ BIND('\\u0027' AS ?y) }} }}",
    # rdflib reads \u followed by eight hex digits as one code point (\u00000022 is a quote);
    # SPARQL's \u takes four, so Oxigraph reads U+0000 and the text "0022", inside the string.
    "\\u with eight digits": f'SELECT * WHERE {{ {{ BIND("\\u00000022" AS ?x) }} UNION {{ SERVICE {ELSEWHERE} '
                            f'{PATTERN} }} UNION {{ BIND("\\u00000022" AS ?y) }} }}',
}


@pytest.mark.parametrize("text", DISAGREEMENTS.values(), ids=DISAGREEMENTS.keys())
def test_service_hidden_from_the_parser_but_seen_by_the_store_is_refused(text):
    form, refusal = judged(text)
    assert refusal is not None and refusal.status in (400, 403), f"passed as {form}: {text!r}"


# --- 400: not one readable query -----------------------------------------------------------

@pytest.mark.parametrize("text", [
    "hello world",
    "SELECT * WHERE { ?s ?p ?o",
    "SELECT * {} SELECT * {}",
    f"{SELECT} ; INSERT DATA {{ <http://a> <http://b> <http://c> }}",
    "SELECT * WHERE { ?s ?p ?o } LIMIT ten",
    'SELECT * WHERE { ?s ?p "a\\u000Ab" }',  # a line break inside a short string, once the escape is read
])
def test_text_that_is_not_a_query_is_refused_with_400(text):
    form, refusal = judged(text)
    assert (form, refusal.status) == (None, 400), refusal
    assert "not a SPARQL query" in refusal.reason


# --- the canonical text: what both parsers read alike ---------------------------------------

def test_the_forwarded_text_has_lf_line_ends_and_no_escapes():
    query, refusal, text = post_query("SELECT ?x\r\nWHERE {\r\n\t?s <http://example.org/\\u0041> \"\\U0001F600\" }")
    assert refusal is None
    assert query.text == text == "SELECT ?x\nWHERE {\n\t?s <http://example.org/A> \"\U0001F600\" }"


@pytest.mark.parametrize("character", ["\r", "\x00", "\x0b", "\x0c", "\x1b", "\x7f", "\x85", "\u2028", "\u2029"])
def test_line_breaks_other_than_lf_and_control_characters_are_refused(character):
    for text in (f"SELECT * WHERE {{ ?s ?p ?o # a comment{character} }}\n",
                 f'SELECT * WHERE {{ ?s ?p """{character}""" }}'):
        form, refusal = judged(text)
        assert (form, refusal.status) == (None, 400), repr(text)
        assert "control characters" in refusal.reason


@pytest.mark.parametrize("text", [
    'SELECT * WHERE { ?s ?p "\\u000D" }',          # an escape that makes a line break rdflib does not end a comment at
    'SELECT * WHERE { ?s ?p "\\u0000" }',
    'SELECT * WHERE { ?s ?p "\\u005Cu0053" }',     # an escape that makes another escape
    'SELECT * WHERE { ?s ?p "\\U0000005CU00000053" }',
    'SELECT * WHERE { ?s ?p "\\uD800" }',          # a surrogate names no character
    'SELECT * WHERE { ?s ?p "\\U00110000" }',      # past Unicode's last code point
])
def test_escapes_that_make_controls_escapes_or_nothing_are_refused(text):
    form, refusal = judged(text)
    assert (form, refusal.status) == (None, 400), refusal


@pytest.mark.parametrize("text", ["", "   \n", "# only a comment", "PREFIX ex: <http://example.org/>"])
def test_text_with_no_query_in_it_is_refused(text):
    # An empty text is also an empty update, so 403 is as right as 400: only that it is refused matters.
    refusal = refusal_of(get(urlencode({"query": text})))
    assert refusal.status in (400, 403)


@pytest.mark.parametrize("result, count", [
    (get(urlencode([("query", SELECT), ("query", SELECT)])), 2),
    (post_form([("query", SELECT), ("query", SELECT)]), 2),
    (post_form({"query": SELECT}, query_string=urlencode({"query": SELECT})), 2),
    (get(""), 0),
    (get(urlencode({"format": "json", "Query": SELECT})), 0),
    (post_form({"default-graph-uri": "http://g/1"}), 0),
    (post_form(b""), 0),
], ids=["GET two", "POST form two", "POST form one in the URL one in the body", "GET none",
        "GET only other parameters", "POST form only a dataset", "POST form empty"])
def test_exactly_one_query_parameter(result, count):
    assert_refused(result, 400, f"not {count}")


@pytest.mark.parametrize("result", [
    get("query=%FF%FE"),
    get("query=%ED%A0%80"),                       # an encoded surrogate is not UTF-8 either
    get("query=SELECT%20*%20%7B%7D&default-graph-uri=%C3"),
    post_form(b"query=%FF"),
    post_form(b"query=\xff"),
    post_query(b"SELECT * WHERE { ?s ?p \"\xff\" }"),
], ids=["GET %FF", "GET surrogate", "GET truncated sequence in another parameter", "POST form %FF",
        "POST form raw byte", "POST query raw byte"])
def test_invalid_utf8_is_refused_with_400(result):
    assert_refused(result, 400, "UTF-8")


def many(count):
    return [(f"p{index}", "1") for index in range(count)]


def test_more_than_100_parameters_are_refused_with_400():
    assert MAX_FIELDS == 100
    assert get(urlencode([*many(99), ("query", SELECT)]))[1] is None
    assert post_form([*many(99), ("query", SELECT)])[1] is None
    assert_refused(get(urlencode([*many(100), ("query", SELECT)])), 400, "more than 100 parameters")
    assert_refused(post_form([*many(100), ("query", SELECT)]), 400, "more than 100 parameters")
    assert_refused(post_form({"query": SELECT}, query_string=urlencode(many(101))), 400, "more than 100")


def test_parameters_are_counted_over_the_whole_request():
    # 60 in the URL and 61 in the body: the request has 121 parameters.
    result = post_form([*many(60), ("query", SELECT)], query_string=urlencode(many(60)))
    assert_refused(result, 400, "more than 100 parameters")


# --- 405, 415, 413 -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "get"])
def test_methods_other_than_get_and_post_are_refused_with_405(method):
    assert_refused(read_request(method, urlencode({"query": SELECT}), QUERY_TYPE, SELECT.encode(), LIMIT), 405,
                   "GET or POST")


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/json", "application/sparql-results+json",
                                          "multipart/form-data; boundary=x", "application/sparql-queryx"])
def test_post_of_another_content_type_is_refused_with_415(content_type):
    assert_refused(post_query(SELECT, content_type=content_type), 415, FORM_TYPE, QUERY_TYPE)


def test_a_query_over_the_limit_is_refused_with_413_in_every_form():
    text = "SELECT ?é WHERE { ?s ?p ?é }"  # 30 bytes in UTF-8, 28 characters
    size = len(text.encode())
    for limit, passes in ((size, True), (size - 1, False), (len(text), False)):
        results = {"GET": read_request("GET", urlencode({"query": text}), None, b"", limit),
                   "POST form": read_request("POST", "", FORM_TYPE, urlencode({"query": text}).encode(), limit),
                   "POST query": read_request("POST", "", QUERY_TYPE, text.encode(), limit)}
        for how, (query, refusal, seen) in results.items():
            if passes:
                assert refusal is None and query.text == text, (limit, how)
            else:
                assert (refusal.status, seen) == (413, text), (limit, how)
                assert f"limit of {limit} bytes" in refusal.reason


# --- reasons are printable ASCII -----------------------------------------------------------

HOSTILE = "\x1b[31m\x1b]0;owned\x07\r\nX-Injected: yes\r\n\x00\x7f\u2028\u0085\ufeff\U0001F600é"

REFUSALS = {
    "a method": read_request("P\x1bUT" + HOSTILE, "", None, b"", LIMIT),
    "a content type": post_query(SELECT, content_type="text/plain\r\n" + HOSTILE),
    "a query with control characters": get(urlencode({"query": "SELECT" + HOSTILE})),
    "a query starting with them": get(urlencode({"query": HOSTILE + SELECT})),
    "control characters in a string": get(urlencode({"query": f'SELECT * WHERE {{ ?s ?p "{HOSTILE}" . ! }}'})),
    "an update with them": post_query(f'INSERT DATA {{ <http://a> <http://b> "{HOSTILE}" }}'),
    "a SERVICE with them": post_query(f'SELECT * WHERE {{ SERVICE {ELSEWHERE} {{ ?s ?p "{HOSTILE}" }} }}'),
    "newlines before the error": get(urlencode({"query": "SELECT *\n\n\r\nWHERE {\n" + HOSTILE})),
    "a long hostile line": get(urlencode({"query": "SELECT " + HOSTILE * 200})),
    "too long": read_request("POST", "", QUERY_TYPE, (SELECT + HOSTILE).encode(), 5),
    "deep": get(urlencode({"query": "SELECT * WHERE " + "{" * 2000 + HOSTILE})),
}


@pytest.mark.parametrize("result", REFUSALS.values(), ids=REFUSALS.keys())
def test_every_reason_is_printable_ascii_starting_with_refused(result):
    refusal = refusal_of(result)
    assert refusal.reason.startswith(REFUSED)
    assert all(" " <= char <= "~" for char in refusal.reason), repr(refusal.reason)
    assert 400 <= refusal.status < 500


# --- deep nesting: a 4xx, never an exception -----------------------------------------------

DEEP = 2000
NESTED = {
    "braces": "SELECT * WHERE " + "{" * DEEP + "}" * DEEP,
    "braces never closed": "SELECT * WHERE " + "{" * DEEP,
    "OPTIONAL": "SELECT * WHERE { " + "OPTIONAL { " * DEEP + "}" * (DEEP + 1),
    "UNION": "SELECT * WHERE " + "{ { ?s ?p ?o } UNION " * DEEP + "{ }" + " }" * DEEP,
    "subqueries": "SELECT * WHERE { " + "{ SELECT * WHERE { " * DEEP + "}}" * DEEP + " }",
    "parentheses": "SELECT * WHERE { FILTER(" + "(" * DEEP + "1" + ")" * DEEP + ") }",
    "NOT": "SELECT * WHERE { FILTER(" + "!" * DEEP + "true) }",
    "blank node lists": "SELECT * WHERE { ?s ?p " + "[ ?q " * DEEP + "?o" + " ]" * DEEP + " }",
    "collections": "SELECT * WHERE { ?s ?p " + "( " * DEEP + "?o" + " )" * DEEP + " }",
    "EXISTS": "SELECT * WHERE { " + "FILTER EXISTS { " * DEEP + "}" * DEEP + " }",
    "an update": "INSERT DATA { " + "{" * DEEP,
}


@pytest.mark.parametrize("text", NESTED.values(), ids=NESTED.keys())
def test_deeply_nested_queries_are_refused_not_raised(text):
    form, refusal = parsed_verdict(text)
    assert form is None and 400 <= refusal.status < 500, refusal
    assert refusal.reason.startswith(REFUSED)
    sent = read_request("POST", "", QUERY_TYPE, text.encode(), len(text.encode()))
    assert refusal_of(sent).status == refusal.status


# --- verdicts are kept -------------------------------------------------------------------

def test_a_verdict_is_kept_so_a_repeated_query_is_parsed_once():
    parsed = []

    def parse(text):
        parsed.append(text)
        return parsed_verdict(text)

    first, second = f"{SELECT} # {id(parsed)} first", f"{SELECT} # {id(parsed)} second"
    assert [judge_query(text, parse) for text in (first, first, second, first)] == [("SELECT", None)] * 4
    assert parsed == [first, second]
    assert read_request("GET", urlencode({"query": first}), None, b"", LIMIT, parse)[0].form == "SELECT"
    assert parsed == [first, second]


# --- the query's fingerprint ---------------------------------------------------------------

def test_query_sha256_is_the_same_for_text_and_its_utf8_bytes():
    assert query_sha256("SELECT ?é {}") == query_sha256("SELECT ?é {}".encode())
    assert query_sha256(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert len(query_sha256("\ud800 a lone surrogate")) == 64
