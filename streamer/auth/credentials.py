"""Find and check the credentials of a request, in the order of the contract."""

from __future__ import annotations

from aiohttp import web

from .sessions import SESSION_COOKIE, identity_from_session
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


def uses_session_cookie(request: web.Request) -> bool:
    """True when the session cookie is what this request's credentials would be."""
    return SESSION_COOKIE in request.cookies and (
        "Authorization" not in request.headers and "token" not in request.query
    )


async def authenticate(request: web.Request, secret: str) -> Identity:
    """Bearer header, then `?token=`, then the session cookie.

    Raises InvalidToken, or SessionStoreUnavailable when the session store cannot be read.
    """
    token = token_from_request(request)
    if token is not None:
        return verify_token(secret, token)
    identity = await identity_from_session(request)
    if identity is None:
        raise InvalidToken("no credentials: send a Bearer token, ?token= or a session cookie")
    return identity
