"""Bearer tokens: who is calling, and in which role (site, researcher or operator).

Tokens are random and shown once when created; the registry keeps only their
sha256, so a copy of the database does not let anyone act as a site or researcher.
"""

import hashlib
import secrets
from dataclasses import dataclass

from apiflask import HTTPTokenAuth
from flask import current_app


SITE = "site"
RESEARCHER = "researcher"
OPERATOR = "operator"  # reads what every site and researcher does (/api/operator, the dashboard); changes nothing

token_auth = HTTPTokenAuth(scheme="Bearer",
                           description="A site's, researcher's or operator's token, from the operator.")


@dataclass(frozen=True)
class Principal:
    role: str
    id: int
    name: str


def new_token():
    return "pht_" + secrets.token_urlsafe(32)


def hash_token(token):
    return hashlib.sha256(token.encode()).hexdigest()


@token_auth.verify_token
def _verify_token(token):
    if not token:
        return None
    found = current_app.extensions["pht"].tokens.find(hash_token(token))
    return Principal(*found) if found else None


@token_auth.get_user_roles
def _roles_of(principal):
    return [principal.role]


def caller():
    return token_auth.current_user
