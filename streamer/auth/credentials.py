"""Find and check the credentials of a request, in the order of the contract."""

from __future__ import annotations

from aiohttp import web

from ..request_query import QueryError, query_value
from .delegated import DelegatedAuth
from .sessions import SESSION_COOKIE, identity_from_session
from .tokens import MAX_TOKEN_LENGTH, Identity, InvalidToken, verify_token

# "Token" is how Django REST framework clients send theirs; it is only read when such
# tokens can be checked (delegated authentication).
DELEGATED_SCHEMES = ("bearer", "token")


def token_from_request(request: web.Request, *, delegated: bool = False) -> str | None:
    """`Authorization: Bearer <token>` first, then `?token=` (browsers cannot set headers)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        schemes = DELEGATED_SCHEMES if delegated else ("bearer",)
        if scheme.lower() not in schemes or not value.strip():
            raise InvalidToken("Authorization header must be 'Bearer <token>'")
        return value.strip()
    try:
        return query_value(request, "token")
    except QueryError as exc:
        raise InvalidToken(str(exc)) from None


def uses_cookie_credentials(request: web.Request, *, delegated: bool = False) -> bool:
    """True when a cookie is what this request's credentials would be: the session
    cookie, or with delegated authentication any cookie of the application."""
    if "Authorization" in request.headers or _has_token_parameter(request):
        return False
    if delegated:
        return bool(request.headers.get("Cookie"))
    return SESSION_COOKIE in request.cookies


def _has_token_parameter(request: web.Request) -> bool:
    try:
        return query_value(request, "token") is not None
    except QueryError:  # a token, if one that will be refused
        return True


async def authenticate(
    request: web.Request,
    secret: str,
    delegated: DelegatedAuth | None = None,
    *,
    cookie_usable: bool,
) -> Identity:
    """Bearer header, then `?token=`, then the session cookie; with delegated
    authentication, what streamer cannot verify itself is asked of the auth service.

    `cookie_usable`: the request comes from the service's own or a listed origin (or
    from no page), a configured `*` aside. Otherwise a token that streamer cannot verify
    goes to the auth service without the request's cookies: a page of any site could
    add a junk token to a request that the browser sends with the user's cookies.

    Raises InvalidToken, SessionStoreUnavailable when the session store cannot be read,
    or AuthUnavailable when the auth service cannot say.
    """
    token = token_from_request(request, delegated=delegated is not None)
    cookie = request.headers.get("Cookie") or None
    if token is not None:
        try:
            return verify_token(secret, token)
        except InvalidToken:
            if delegated is None or len(token) > MAX_TOKEN_LENGTH:
                raise
        return await delegated.check(token, cookie if cookie_usable else None)
    identity = await identity_from_session(request)
    if identity is not None:
        return identity
    if delegated is not None and cookie is not None:
        return await delegated.check(None, cookie)
    raise InvalidToken("no credentials: send a Bearer token, ?token= or a session cookie")
