"""Who is looking at the dashboard: a signed cookie that names the API token they logged in with.

The session cookie holds the token's sha256 (what store.find_principal looks up), never the token, and is
checked against the database on every request: a revoked or rotated token ends its dashboard session at once.
It also holds when the visitor logged in (a session ends SESSION_SECONDS later, whatever they do) and the
session's CSRF token, which every form sends back in a hidden field.

Before logging in, the login form's CSRF token is kept in a cookie of its own (LOGIN_COOKIE_NAME). A link from
another site arrives without either cookie (both are SameSite=Strict): what is set for that visit must not
replace the session cookie the browser still holds, or every such link would log the visitor out.

The cookie is signed with a key made once and kept in the database's meta table: every replica of the registry
(one shared database) and every restart check cookies with the same key, and the operator has nothing more to
copy between machines. Someone who can read the database can therefore sign cookies; they can also read every
token hash, task and result there, so the database stays what must be kept private (docs/dashboard.md).
"""

import hmac
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from itsdangerous import BadSignature, URLSafeSerializer

from master import store

COOKIE_NAME = "pht_dashboard"
LOGIN_COOKIE_NAME = "pht_dashboard_login"
SESSION_SECONDS = 8 * 3600  # a working day: after it, log in again
_SECRET_KEY = "dashboard_cookie_secret"  # its row in the meta table
_SALT = "pht-dashboard-visit"


@dataclass(frozen=True)
class Visit:
    """What the cookie says: the visit's CSRF token, and, once logged in, the token's sha256 and when."""
    csrf: str
    token_hash: str | None = None
    logged_in_at: float | None = None


def new_visit():
    """A visitor who has not logged in: a CSRF token for the login form, nothing else."""
    return Visit(csrf=secrets.token_urlsafe(32))


def logged_in(token_hash, now):
    """A visit that begins with a log-in: a new CSRF token too, so that none chosen before it carries over."""
    return Visit(csrf=secrets.token_urlsafe(32), token_hash=token_hash, logged_in_at=now)


def refusal(looks_like_a_token, holder):
    """Pure: (message, HTTP status) saying why a log-in is refused, or None. holder is store.find_principal's
    answer for the token: (role, id, name), or None when no one holds it."""
    if not looks_like_a_token:
        return "Paste the token the registry's operator gave you.", 400
    if holder is None:
        return "That token is unknown, or it was revoked: ask the registry's operator for one.", 401
    if holder[0] == store.SITE:
        return ("A site's token cannot log in here: the dashboard is for researchers and the registry's operator. "
                "A site's IT officer uses runScript.py at the site."), 403
    return None


def is_expired(visit, now, lifetime=SESSION_SECONDS):
    """Pure: whether a logged-in visit is past its lifetime (a visit from the future counts as expired too)."""
    return visit.logged_in_at is not None and not 0 <= now - visit.logged_in_at < lifetime


def csrf_matches(visit, sent):
    """Whether a form sent back this visit's CSRF token, compared in constant time."""
    return visit is not None and isinstance(sent, str) and hmac.compare_digest(visit.csrf.encode(), sent.encode())


def cookie_signer(secret):
    return URLSafeSerializer(secret, salt=_SALT)


def cookie_value(signer, visit):
    return signer.dumps({"c": visit.csrf, "t": visit.token_hash, "at": visit.logged_in_at})


def visit_from_cookie(signer, value):
    """The visit a cookie signed by this registry holds; None for no cookie, a forged or a malformed one."""
    if not value:
        return None
    try:
        data = signer.loads(value)
    except BadSignature:
        return None
    if not (isinstance(data, dict) and isinstance(data.get("c"), str)
            and (data.get("t") is None or isinstance(data["t"], str))
            and (data.get("at") is None or isinstance(data["at"], (int, float)))):
        return None
    return Visit(csrf=data["c"], token_hash=data["t"], logged_in_at=data["at"])


def cookie_secret(engine):
    """The key that signs the dashboard's cookies: read from the meta table, made there by the first registry
    that needs it. Replicas starting at once may both try to make it: the first insert wins, and both read it."""
    row = store.meta.c.key == _SECRET_KEY
    with engine.connect() as conn:
        found = conn.execute(sa.select(store.meta.c.value).where(row)).scalar()
    if found:
        return found
    try:
        with engine.begin() as conn:
            conn.execute(store.meta.insert().values(key=_SECRET_KEY, value=secrets.token_hex(32)))
    except sa.exc.IntegrityError:
        pass
    with engine.connect() as conn:
        return conn.execute(sa.select(store.meta.c.value).where(row)).scalar_one()
