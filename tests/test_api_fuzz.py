"""schemathesis against the registry's own OpenAPI document, with valid tokens of the right role.

Every generated request, valid or not, must get an answer the document allows, and never a 5xx.
The example count is bounded so the suite stays quick.
"""

import re

import hypothesis
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

from master import auth, store
from master.app import Settings, create_app


@pytest.fixture(scope="module")
def registry_app(tmp_path_factory):
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("fuzzed-registry"), max_input_bytes=64 * 1024))
    engine = app.extensions["pht"].engine
    tokens = {}
    for role in (store.RESEARCHER, store.SITE, store.OPERATOR):
        tokens[role] = auth.new_token()
        store.create_principal(engine, role, f"fuzz-{role}", auth.hash_token(tokens[role]))
    # Some stored state, so that reads and reports also reach code past "not found".
    task_id, _ = store.create_task(engine, 1, "127.0.0.1:5050/pht/x:1", b"{}", None)
    store.claim_next_run(engine, 1, 60)
    app.config["FUZZ_TOKENS"] = tokens
    return app


def test_no_request_breaks_the_registry_or_its_document(registry_app):
    # Driven directly rather than through schemathesis' pytest loader, which does not run on pytest 9.
    schema = schemathesis.openapi.from_wsgi("/openapi.json", registry_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16
    for operation in operations:
        role = ("site" if operation.path.startswith("/api/site/") else
                "operator" if operation.path.startswith("/api/operator/") else "researcher")
        # A task needs exactly one of input and input_base64 (valid base64): a rule across fields
        # that the document states only in words, so a generated task may be refused with 422.
        rules_the_document_cannot_state = (
            [positive_data_acceptance] if (operation.method, operation.path) == ("post", "/api/tasks") else [])
        headers = {"Authorization": f"Bearer {registry_app.config['FUZZ_TOKENS'][role]}"}

        @hypothesis.given(case=operation.as_strategy())
        # No shrinking: a failure is reported as found, so the test stays bounded in time.
        @hypothesis.settings(max_examples=25, deadline=None, database=None,
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                             suppress_health_check=list(hypothesis.HealthCheck))
        def call_and_validate(case):
            # A valid long-poll would really wait, up to two minutes each: ask for none. The API
            # reads 5, 5.0 and "5" alike as a number of seconds.
            for part in (case.body, case.query):
                if isinstance(part, dict) and _reads_as_positive_number(part.get("wait_seconds")):
                    part["wait_seconds"] = 0
            case.call_and_validate(headers=headers, excluded_checks=rules_the_document_cannot_state)

        call_and_validate()


def _reads_as_positive_number(value):
    try:
        return float(value) > 0
    except (TypeError, ValueError, OverflowError):
        return False


@pytest.mark.parametrize("depth", [33, 50_000])
def test_deeply_nested_json_is_refused_with_400_by_every_operation(registry_app, depth):
    """Nested deeper than the registry reads (32), a body is refused before any handler sees it: at
    50,000 levels Python's JSON parser itself would raise RecursionError, once a 500."""
    client = registry_app.test_client()
    body = "[" * depth + "]" * depth
    document = client.get("/openapi.json").json
    operations = [(method, path) for path, item in document["paths"].items() for method, operation in item.items()
                  if "application/json" in operation.get("requestBody", {}).get("content", {})]
    assert len(operations) >= 8
    for method, path in operations:
        role = "site" if path.startswith("/api/site/") else "researcher"
        answer = client.open(re.sub(r"\{[^}]+\}", "1", path), method=method.upper(), data=body,
                             headers={"Authorization": f"Bearer {registry_app.config['FUZZ_TOKENS'][role]}",
                                      "Content-Type": "application/json"})
        assert answer.status_code == 400, f"{method} {path}: {answer.status_code} {answer.get_data(as_text=True)[:200]}"
        assert "nested" in answer.json["message"], answer.json
