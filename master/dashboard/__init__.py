"""The registry's web dashboard, at /ui/, for researchers and the registry's operator (docs/dashboard.md).

Server-rendered pages (views.py, templates/), who is looking (login.py), how things are shown (looks.py)
and live updates (live.py, static/live.js). Nothing beyond Flask and its templates.
"""

from master.dashboard import login
from master.dashboard.views import bp


def register_dashboard(app):
    """Serve the dashboard at /ui/, its cookies signed with the key kept in the registry's database."""
    app.config["DASHBOARD_COOKIE_SECRET"] = login.cookie_secret(app.extensions["pht"].engine)
    app.register_blueprint(bp)
