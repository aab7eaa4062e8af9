"""JSON request bodies: read only for a caller the registry knows, whole, and only as deep as this API nests.

Every `@input` body is loaded by apiflask's webargs parser, which runs inside `@auth_required`: so the
checks live in that parser's "json" loader, and a caller without a token makes the registry read (or
parse) none of its body. A check in `before_request` would read a trickled or 8 MB body for anyone.
"""

import json

from apiflask import abort
from apiflask.schema_adapters.marshmallow import parser  # the parser every marshmallow @input uses
from flask import current_app

MAX_DEPTH = 32
_TOO_DEEP = f"JSON nested more than {MAX_DEPTH} levels deep; no request of this API needs that"


def read_checked():
    """Make every `@input` JSON body go through `load_checked_json`. Idempotent."""
    parser.location_loader("json")(load_checked_json)


def load_checked_json(request, schema):
    body = request.get_data(cache=True)
    # A chunked body (no Content-Length) is read up to MAX_CONTENT_LENGTH and then returned cut short
    # as if it were whole; the schema would call it broken JSON, a 400, when it is too large.
    if request.content_length is None and getattr(request.stream, "is_exhausted", False):
        abort(413, f"the request body is larger than {current_app.config['MAX_CONTENT_LENGTH']} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except RecursionError:  # Python's parser recurses: thousands of levels would otherwise be a 500
        abort(400, _TOO_DEEP)
    except ValueError:  # no JSON at all (or empty): webargs' own answer for that
        return parser.load_json(request, schema)
    problem = nesting_problem(value)
    if problem:
        abort(400, problem)
    return value


def nesting_problem(value):
    """Pure: why a parsed JSON value is nested too deeply for this API, or None."""
    containers = [(value, 1)] if isinstance(value, (dict, list)) else []
    while containers:
        container, depth = containers.pop()
        if depth > MAX_DEPTH:
            return _TOO_DEEP
        children = container.values() if isinstance(container, dict) else container
        containers += [(child, depth + 1) for child in children if isinstance(child, (dict, list))]
    return None
