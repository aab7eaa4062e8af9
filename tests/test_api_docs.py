"""The /docs page of the registry and of the FileService works offline and runs no one else's code:
every file it uses is the service's own, and a strict Content-Security-Policy tells the browser to keep
it that way."""

import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from apiflask import APIFlask

from fileservice.app import create_app as create_fileservice_app
from master.api_docs import register_api_docs
from master.app import Settings, create_app

CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(params=["registry", "fileservice"])
def client(request, tmp_path):
    if request.param == "fileservice":
        yield create_fileservice_app(tmp_path, max_file_bytes=1024).test_client()
        return
    app = create_app(Settings(data_dir=tmp_path))
    yield app.test_client()
    app.extensions["pht"].engine.dispose()


class PageParts(HTMLParser):
    """The URLs a page loads (every src and href), its inline scripts and styles, and its tags' attributes."""

    def __init__(self, html):
        super().__init__()
        self.urls, self.inline_code, self.attributes_by_id = [], [], {}
        self._in_inline = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.urls += [value for name, value in attrs if name in ("src", "href")]
        if "id" in attributes:
            self.attributes_by_id[attributes["id"]] = attributes
        if tag == "style" or (tag == "script" and "src" not in attributes):
            self._in_inline = tag
        if "style" in attributes or any(name.startswith("on") for name in attributes):
            self.inline_code.append(f"<{tag}> attributes {sorted(attributes)}")

    def handle_data(self, data):
        if self._in_inline and data.strip():
            self.inline_code.append(f"<{self._in_inline}> {data.strip()[:80]}")

    def handle_endtag(self, tag):
        self._in_inline = None


def docs_page(client):
    response = client.get("/docs")
    assert response.status_code == 200, f"/docs answered {response.status_code}"
    return response, PageParts(response.get_data(as_text=True))


def csp_directives(response):
    header = response.headers.get("Content-Security-Policy")
    assert header, f"{response.request.path} has no Content-Security-Policy"
    return {name: sources for name, *sources in (part.split() for part in header.split(";") if part.strip())}


def test_docs_page_loads_nothing_from_another_origin(client):
    _, page = docs_page(client)
    assert page.urls, "the /docs page references no files"
    for url in page.urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc and url.startswith("/"), \
            f"/docs loads {url}, which is not a path on the registry itself"
    assert not page.inline_code, f"/docs has inline code a strict Content-Security-Policy blocks: {page.inline_code}"


def test_docs_files_are_served_by_the_registry(client):
    _, page = docs_page(client)
    scripts = []
    for url in page.urls:
        response = client.get(url)
        assert response.status_code == 200, f"{url} answered {response.status_code}"
        suffix = re.search(r"\.\w+$", urlsplit(url).path).group()
        assert response.mimetype == CONTENT_TYPES[suffix], f"{url} is served as {response.mimetype}"
        assert len(response.data) > 100, f"{url} is nearly empty ({len(response.data)} bytes)"
        if suffix == ".js":
            scripts.append(response.get_data(as_text=True))
    assert any("SwaggerUIBundle=" in script or "SwaggerUIBundle =" in script for script in scripts), \
        "no script on /docs defines SwaggerUIBundle"
    assert any("SwaggerUIBundle(" in script and "specUrl" in script for script in scripts), \
        "no script on /docs starts Swagger UI on the page's document URL"


def test_docs_page_and_files_carry_a_strict_content_security_policy(client):
    page_response, page = docs_page(client)
    for response in [page_response] + [client.get(url) for url in page.urls]:
        path = response.request.path
        directives = csp_directives(response)
        assert directives.get("default-src") == ["'self'"], f"{path}: default-src is {directives.get('default-src')}"
        script_sources = directives.get("script-src", directives["default-src"])
        assert "'unsafe-inline'" not in script_sources and "'unsafe-eval'" not in script_sources, \
            f"{path}: script-src allows {script_sources}"
        assert directives.get("frame-ancestors") == ["'none'"], f"{path}: other sites may frame the page"
        other_origins = [source for sources in directives.values() for source in sources
                         if re.match(r"(https?:|\*|//)", source) or "." in source]
        assert not other_origins, f"{path}: the policy lets in {other_origins}"
        assert response.headers.get("X-Content-Type-Options") == "nosniff", f"{path} lacks nosniff"


def test_docs_page_shows_the_services_openapi_document(client):
    _, page = docs_page(client)
    spec_url = page.attributes_by_id.get("swagger-ui", {}).get("data-spec-url")
    assert spec_url, "/docs names no OpenAPI document on its #swagger-ui element"
    response = client.get(spec_url)
    assert response.status_code == 200 and response.is_json, f"{spec_url} answered {response.status_code}"
    assert response.json["info"]["title"] in ("Personal Health Train registry", "PHT FileService")
    assert response.json["paths"]


def test_register_api_docs_refuses_an_app_that_serves_apiflasks_page():
    with pytest.raises(ValueError, match="docs_path=None"):
        register_api_docs(APIFlask("with-apiflask-docs", spec_path="/openapi.json", docs_path="/docs"))
