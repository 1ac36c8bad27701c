"""Find and check the credentials of a request, in the order of the contract."""

from __future__ import annotations

from aiohttp import web

from .tokens import Identity, InvalidToken, verify_token


def token_from_request(request: web.Request) -> str | None:
    """`Authorization: Bearer <token>` first, then `?token=` (browsers cannot set headers)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise InvalidToken("Authorization header must be 'Bearer <token>'")
        return value.strip()
    return request.query.get("token")


def authenticate(request: web.Request, secret: str) -> Identity:
    token = token_from_request(request)
    if token is None:
        raise InvalidToken("no credentials: send a Bearer token or ?token=")
    return verify_token(secret, token)
