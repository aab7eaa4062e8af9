"""Serves the API's browsable documentation (Swagger UI) at /docs from this registry alone.

apiflask's own /docs page loads Swagger UI from a CDN, unpinned, with inline scripts: offline (as on
hospital networks) the page stays blank, and online it runs whatever that third party serves. Here:
- Swagger UI's files come from the pinned flask-swagger-ui package (requirements.txt) and are served
  by the registry itself; only the few files the page uses are served.
- The page holds no inline script or style. Its start-up code is a served file that reads the URL
  of the registry's OpenAPI document from the page, so the Content-Security-Policy can refuse every
  inline script and every other origin.
- The page and its files say so in a strict Content-Security-Policy and with nosniff, so a browser
  runs them only as the scripts and stylesheets they are.
"""

from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, abort, current_app, render_template_string, send_from_directory

SWAGGER_UI_DIR = Path(flask_swagger_ui.__file__).parent / "dist"

# The files the page uses, with their content types named here rather than guessed from the
# machine's MIME table: under nosniff a browser refuses a script or stylesheet sent as text/plain.
SWAGGER_UI_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "index.css": "text/css",  # Swagger UI's page layout, which its own index.html would inline
    "favicon-32x32.png": "image/png",
}

# Swagger UI draws its icons as data: images in its stylesheet; nothing else leaves 'self'. No
# <base> may redirect the page's relative URLs, and no other site may frame the page.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")

START_SWAGGER_UI_JS = """\
// Starts Swagger UI on the document named by the page's #swagger-ui element. A served file rather
// than an inline script, so that the page's Content-Security-Policy can forbid inline scripts.
var container = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: container.dataset.specUrl,
  domNode: container,
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  plugins: [SwaggerUIBundle.plugins.DownloadUrl],
  layout: "BaseLayout",
  // Otherwise Swagger UI sends the document's address to validator.swagger.io for a badge.
  validatorUrl: null
});
"""

DOCS_PAGE = """\
<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{{ title }} {{ version }} - API documentation</title>
  <link rel="stylesheet" href="{{ url_for('api_docs.swagger_ui_file', name='swagger-ui.css') }}">
  <link rel="stylesheet" href="{{ url_for('api_docs.swagger_ui_file', name='index.css') }}">
  <link rel="icon" type="image/png" href="{{ url_for('api_docs.swagger_ui_file', name='favicon-32x32.png') }}">
</head>
<body>
  <div id="swagger-ui" data-spec-url="{{ url_for('openapi.spec') }}"></div>
  <script src="{{ url_for('api_docs.swagger_ui_file', name='swagger-ui-bundle.js') }}"></script>
  <script src="{{ url_for('api_docs.start_swagger_ui') }}"></script>
</body>
</html>
"""

docs = Blueprint("api_docs", __name__, url_prefix="/docs")


@docs.get("")
def docs_page():
    return render_template_string(DOCS_PAGE, title=current_app.title, version=current_app.version)


@docs.get("/start-swagger-ui.js")
def start_swagger_ui():
    return START_SWAGGER_UI_JS, {"Content-Type": "text/javascript; charset=utf-8"}


@docs.get("/swagger-ui/<name>")
def swagger_ui_file(name):
    if name not in SWAGGER_UI_FILES:
        abort(404)
    return send_from_directory(SWAGGER_UI_DIR, name, mimetype=SWAGGER_UI_FILES[name])


@docs.after_request
def _confine_to_own_origin(response):
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def register_api_docs(app):
    """Serve /docs from local Swagger UI files; the app must leave /docs free (docs_path=None)."""
    if app.docs_path:
        raise ValueError(f"APIFlask(docs_path={app.docs_path!r}) serves apiflask's CDN page there; create the "
                         "app with docs_path=None, and register_api_docs serves /docs")
    if not app.spec_path:
        raise ValueError("register_api_docs shows the app's OpenAPI document; create the app with spec_path set")
    app.register_blueprint(docs)
