"""Counting the rows of a streamed SPARQL result (client/sparql_results.py), whatever the chunks.

The documents are real answers: a real Oxigraph (`oxigraph query`) writes them from a store whose
literals are made to look like the structure each counter looks for (`},{"`, `[{`, `<result>`,
quotes, backslashes, newlines, commas). Each count is checked against a real parser's, with the
document split at every byte (small ones) or at seeded random places (large ones).
"""

import csv
import io
import json
import random
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import rdflib

from client.sparql_results import row_counter
from scripts.federation import OXIGRAPH

EX = "http://example.org/"
XSD_INTEGER = "http://www.w3.org/2001/XMLSchema#integer"
HOSTILE = [
    '},{"', "[{", '"},{"s":{"type":"uri"},{', "<result>", "</result><result>", "&lt;result>", '<result/>',
    '"', '""', "'", "\\", '\\"', "\\\\", "\\\\\\", "ends in a backslash \\", 'a quote then a backslash "\\',
    "line\nbreak", "crlf\r\nline", "\r", "\n", "\n\n\n", 'a,b,"c"', ",{", "\t a tab\t", "?s\t?o",
    '[{"a":1},{"b":2}]', '{"head":{"vars":[]}}', "]}}", "\\u0022 not an escape", "é 😀 \u2028 \u0085 \ufeff",
    "\x7f", "", " ", '"\r\n"', 'x",\r\n"y', "\\n is not a newline",
]
JSON_TYPE = "application/sparql-results+json"
XML_TYPE = "application/sparql-results+xml"
CSV_TYPE = "text/csv; charset=utf-8"
TSV_TYPE = "text/tab-separated-values; charset=utf-8"
NT_TYPE = "application/n-triples"
FORMATS = {"json": JSON_TYPE, "xml": XML_TYPE, "csv": CSV_TYPE, "tsv": TSV_TYPE}
SELECTS = {
    "hostile": f"SELECT ?s ?o WHERE {{ ?s <{EX}hostile> ?o }}",
    "hostile, one unbound": f"SELECT ?s ?o ?none WHERE {{ ?s <{EX}hostile> ?o OPTIONAL {{ ?s <{EX}nothing> ?none }} }}",
    "no rows": f"SELECT ?s WHERE {{ ?s <{EX}nothing> ?o }}",
    "no variables": "SELECT * WHERE { }",
    "undefined values": "SELECT ?x ?y WHERE { VALUES (?x ?y) { (UNDEF UNDEF) (1 UNDEF) (UNDEF 2) (UNDEF UNDEF) } }",
}
BULK = f"SELECT ?s ?o ?n WHERE {{ ?s <{EX}bulk> ?o OPTIONAL {{ ?s <{EX}n> ?n }} }}"
BULK_ROWS = 1500


def nt_literal(value):
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def dataset():
    lines = [f"<{EX}h/{index}> <{EX}hostile> {nt_literal(value)} ." for index, value in enumerate(HOSTILE)]
    lines += [f'_:b1 <{EX}hostile> "[{{"@en-GB-x-result .', f"<{EX}a,b> <{EX}hostile> <{EX}c,d> .",
              f'<{EX}h/n> <{EX}hostile> "1"^^<{XSD_INTEGER}> .']
    rng = random.Random(2026)
    for index in range(BULK_ROWS):
        value = "".join(rng.choice(HOSTILE) for _ in range(rng.randint(0, 4)))
        lines.append(f"<{EX}b/{index}> <{EX}bulk> {nt_literal(value)} .")
        if index % 3:
            lines.append(f'<{EX}b/{index}> <{EX}n> "{index}"^^<{XSD_INTEGER}> .')
    return "\n".join(lines) + "\n"


HOSTILE_TRIPLES = len(HOSTILE) + 3


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """{(query name, format): the bytes Oxigraph answered}, and the CONSTRUCT answers as N-Triples."""
    folder = tmp_path_factory.mktemp("oxigraph")
    (folder / "data.nt").write_text(dataset(), encoding="utf-8")
    oxigraph("load", "--location", str(folder / "store"), "--file", str(folder / "data.nt"))

    def query(text, results_format):
        return oxigraph("query", "--location", str(folder / "store"), "--query", text,
                        "--results-format", results_format)

    documents = {(name, fmt): query(text, fmt) for name, text in {**SELECTS, "bulk": BULK}.items() for fmt in FORMATS}
    documents["construct", "nt"] = query(f"CONSTRUCT WHERE {{ ?s <{EX}hostile> ?o }}", "nt")
    documents["bulk construct", "nt"] = query(f"CONSTRUCT WHERE {{ ?s <{EX}bulk> ?o }}", "nt")
    return documents


def oxigraph(*arguments):
    done = subprocess.run([OXIGRAPH, *arguments], capture_output=True)
    assert done.returncode == 0, f"oxigraph {arguments[0]} failed: {done.stderr.decode(errors='replace')[:2000]}"
    return done.stdout


def truth(document, results_format):
    """The number of rows, as a real parser of the format reads them."""
    if results_format == "json":
        return len(json.loads(document)["results"]["bindings"])
    if results_format == "xml":
        return len(ElementTree.fromstring(document).findall(".//{http://www.w3.org/2005/sparql-results#}result"))
    if results_format == "csv":
        return len(list(csv.reader(io.StringIO(document.decode("utf-8"), newline="")))) - 1
    if results_format == "nt":
        return len(rdflib.Graph().parse(data=document.decode("utf-8"), format="nt"))
    return None  # TSV: no parser at hand; its count is checked against the JSON answer's


def counted(content_type, chunks):
    counter = row_counter(content_type)
    for chunk in chunks:
        counter.feed(chunk)
    return counter.rows()


def every_split(document):
    """The document as two chunks, cut at each byte position (and not cut at all)."""
    for position in range(len(document) + 1):
        yield position, [document[:position], document[position:]]


def random_splits(document, seed, times=10):
    rng = random.Random(seed)
    for attempt in range(times):
        largest = [3, 70_000, 64, 16_384, 1024][attempt % 5]
        chunks, position = [], 0
        while position < len(document):
            size = rng.randint(1, largest)
            chunks.append(document[position:position + size])
            position += size
        yield attempt, chunks


def assert_counts(document, content_type, expected, splits):
    for where, chunks in splits:
        assert b"".join(chunks) == document
        rows = counted(content_type, chunks)
        assert rows == expected, f"{rows} rows, not {expected}, with the document cut at {where}"


# --- the documents are what they claim to be ----------------------------------------------

def test_oxigraph_wrote_the_hostile_values_into_every_format(answers):
    for results_format in FORMATS:
        expected = len(json.loads(answers["hostile", "json"])["results"]["bindings"])
        assert expected == HOSTILE_TRIPLES
        if truth(answers["hostile", results_format], results_format) is not None:
            assert truth(answers["hostile", results_format], results_format) == expected, results_format
    assert b"},{" in answers["hostile", "json"] and b'[{\\"a\\":1},{\\"b\\":2}]' in answers["hostile", "json"]
    assert b"&lt;result>" in answers["hostile", "xml"] or b"&lt;result&gt;" in answers["hostile", "xml"]
    assert b'"crlf\r\nline"' in answers["hostile", "csv"]
    assert b"crlf\\r\\nline" in answers["hostile", "tsv"]
    assert truth(answers["construct", "nt"], "nt") == HOSTILE_TRIPLES


# --- exact counts, whatever the chunks ----------------------------------------------------

SMALL = [(name, fmt) for name in SELECTS for fmt in FORMATS]


@pytest.mark.parametrize("name, results_format", SMALL, ids=[f"{name}-{fmt}" for name, fmt in SMALL])
def test_small_answers_count_exactly_cut_at_every_byte(answers, name, results_format):
    document = answers[name, results_format]
    expected = len(json.loads(answers[name, "json"])["results"]["bindings"])
    assert truth(document, results_format) in (None, expected)
    assert_counts(document, FORMATS[results_format], expected, every_split(document))
    assert_counts(document, FORMATS[results_format], expected,
                  [("every byte", [document[i:i + 1] for i in range(len(document))])])


def test_construct_as_ntriples_counts_triples_cut_at_every_byte(answers):
    document = answers["construct", "nt"]
    assert_counts(document, NT_TYPE, HOSTILE_TRIPLES, every_split(document))


@pytest.mark.parametrize("results_format", FORMATS)
def test_a_large_answer_counts_exactly_cut_at_random(answers, results_format):
    document = answers["bulk", results_format]
    assert len(document) > 50_000
    expected = len(json.loads(answers["bulk", "json"])["results"]["bindings"])
    assert expected == BULK_ROWS
    assert truth(document, results_format) in (None, expected)
    assert_counts(document, FORMATS[results_format], expected, random_splits(document, seed=results_format))


def test_a_large_construct_counts_exactly_cut_at_random(answers):
    document = answers["bulk construct", "nt"]
    assert_counts(document, NT_TYPE, BULK_ROWS, random_splits(document, seed="nt"))


@pytest.mark.parametrize("name, results_format", SMALL, ids=[f"{name}-{fmt}" for name, fmt in SMALL])
def test_an_empty_chunk_changes_nothing(answers, name, results_format):
    document = answers[name, results_format]
    expected = len(json.loads(answers[name, "json"])["results"]["bindings"])
    splits = ((position, [document[:position], b"", document[position:]]) for position in range(len(document) + 1))
    assert_counts(document, FORMATS[results_format], expected, splits)


# --- JSON as other writers lay it out -----------------------------------------------------

LAYOUTS = {
    "indent 2": dict(indent=2),
    "tabs": dict(indent="\t"),
    "spaces around separators": dict(indent=None, separators=(" , ", " : ")),
    "newlines before commas": dict(indent=1, separators=("\n,\n", ":\n")),
    "ASCII escapes": dict(indent=2, ensure_ascii=True),
    "unicode as is": dict(ensure_ascii=False),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_json_counts_exactly_however_it_is_laid_out(answers, layout):
    for name in [*SELECTS, "bulk"]:
        parsed = json.loads(answers[name, "json"])
        document = json.dumps(parsed, **layout).replace("\n", "\r\n").encode("utf-8")
        expected = len(parsed["results"]["bindings"])
        assert_counts(document, JSON_TYPE, expected, random_splits(document, seed=name, times=3))


# --- documents written by hand, after the W3C formats ---------------------------------------

W3C_JSON = b"""{
   "head": { "vars": [ "book" , "title" ], "link": [ "http://example.org/meta.rdf" ] } ,
   "results": {
     "bindings": [
       { "book": { "type": "uri" , "value": "http://example.org/book/book6" } ,
         "title": { "type": "literal" , "value": "Harry Potter and the Half-Blood Prince" } } ,
       { "book" : { "type" : "bnode" , "value" : "r1" } ,
         "title": { "type": "literal" , "xml:lang": "en" , "value": "},{\\"book\\":{ [{ \\\\" } } ,
       {}
     ]
   }
}"""
W3C_XML = b"""<?xml version="1.0"?>
<sparql xmlns="http://www.w3.org/2005/sparql-results#">
  <head>
    <variable name="x"/>
    <link href="example.rq" />
  </head>
  <results>
    <result>
      <binding name="x"><literal>&lt;result&gt; and <![CDATA[ not one ]]></literal></binding>
    </result>
    <result>
    </result>
  </results>
</sparql>"""

HANDWRITTEN = {
    "W3C JSON": (W3C_JSON, JSON_TYPE, 3),
    "W3C XML": (W3C_XML, XML_TYPE, 2),
    "CSV without the last newline": (b'x,y\r\n"a\r\nb",1\r\n"c ""quoted""",2', CSV_TYPE, 2),
    "CSV with LF only": (b'x\n"multi\nline"\n\n"a,""b"""\n', CSV_TYPE, 3),
    "TSV without the last newline": (b'?x\t?y\n"a\\nb"\t1\n\t2', TSV_TYPE, 2),
    "TSV header only, no newline": (b"?x", TSV_TYPE, 0),
    "N-Triples without the last newline": (b'<a:s> <a:p> "x\\ny" .\r\n<a:s> <a:p> "z" .', NT_TYPE, 2),
    "nothing at all": (b"", CSV_TYPE, 0),
}


@pytest.mark.parametrize("document, content_type, expected", HANDWRITTEN.values(), ids=HANDWRITTEN.keys())
def test_handwritten_documents_count_exactly_cut_at_every_byte(document, content_type, expected):
    assert_counts(document, content_type, expected, every_split(document))


# --- which types are counted ---------------------------------------------------------------

@pytest.mark.parametrize("content_type, kind", [
    ("application/sparql-results+json", "JsonRows"), ("application/json", "JsonRows"),
    ("Application/SPARQL-Results+JSON; charset=utf-8", "JsonRows"), ("application/sparql-results+xml", "XmlRows"),
    (" text/csv ; charset=utf-8", "CsvRows"), ("text/tab-separated-values", "TsvRows"),
    ("application/n-triples", "NTriplesRows"),
])
def test_the_w3c_result_formats_and_ntriples_are_counted(content_type, kind):
    assert type(row_counter(content_type)).__name__ == kind


@pytest.mark.parametrize("content_type", [
    None, "", "text/turtle", "application/ld+json", "application/rdf+xml", "application/n-quads", "text/plain",
    "application/octet-stream", "application/sparql-results+jsonx", "text/csvx", "json",
])
def test_other_types_give_none(content_type):
    assert row_counter(content_type) is None


def test_each_call_gives_a_fresh_counter():
    first, second = row_counter(JSON_TYPE), row_counter(JSON_TYPE)
    first.feed(b'{"results":{"bindings":[{},{}]}}')
    assert (first.rows(), second.rows()) == (2, 0)
