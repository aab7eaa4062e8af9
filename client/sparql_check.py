"""Does the site's SPARQL endpoint answer? Asked at start-up and before every poll, and told to the registry."""

from SPARQLWrapper import JSON, SPARQLWrapper

TIMEOUT_SECONDS = 5


def sparql_problem(endpoint_url):
    """None if the endpoint answers an ASK query, else what went wrong."""
    endpoint = SPARQLWrapper(endpoint_url)
    endpoint.setQuery("ASK { ?s ?p ?o }")
    endpoint.setReturnFormat(JSON)
    endpoint.setTimeout(TIMEOUT_SECONDS)
    try:
        answer = endpoint.query().convert()
    except Exception as error:  # SPARQLWrapper raises many kinds; each one means "does not answer"
        return f"{type(error).__name__}: {error}"
    if not isinstance(answer, dict) or "boolean" not in answer:
        return "the answer to an ASK query was not a SPARQL result"
    return None
