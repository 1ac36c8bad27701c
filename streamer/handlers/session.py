"""POST and DELETE /auth/session: exchange a token for a session cookie, and log out."""

from __future__ import annotations

from aiohttp import web

from .. import json_input
from ..app_keys import CONFIG
from ..auth.credentials import token_from_request
from ..auth.origin import origin_allowed
from ..auth.sessions import end_session, start_session
from ..auth.tokens import InvalidToken, verify_token
from ..request_body import read_body
from .common import json_error

MAX_BODY_BYTES = 8 * 1024


def _token_from_body(request: web.Request, body: bytes) -> str:
    # JSON only: an HTML form (text/plain) from another site cannot log anyone in.
    if request.content_type != "application/json":
        raise InvalidToken('send the token as application/json: {"token": "..."}')
    try:
        payload = json_input.loads(body)
    except (ValueError, RecursionError):
        raise InvalidToken('the body must be JSON: {"token": "..."}') from None
    token = payload.get("token") if isinstance(payload, dict) else None
    if not isinstance(token, str):
        raise InvalidToken('the body must be JSON: {"token": "..."}')
    return token


async def create_session(request: web.Request) -> web.Response:
    """Log in: the token comes as `Authorization: Bearer` or a JSON body `{"token"}`."""
    config = request.config_dict[CONFIG]
    # Refusing other sites' pages stops login CSRF (logging a victim in as someone else);
    # a configured `*` does not extend to the cookie.
    if not origin_allowed(request, config.allowed_origins, wildcard=False):
        return json_error(403, "origin_not_allowed", "this origin may not log in")
    body = None
    if request.body_exists:
        body = await read_body(request, limit=MAX_BODY_BYTES, timeout_s=config.body_timeout_s)
    try:
        token = token_from_request(request)
        if token is None and body is not None:
            token = _token_from_body(request, body)
        if token is None:
            raise InvalidToken("send the token as Authorization: Bearer or in the JSON body")
        identity = await start_session(request, verify_token(config.secret, token))
    except InvalidToken as exc:
        return json_error(401, "unauthorized", str(exc))
    return web.json_response({"user_id": identity.user_id, "expires_at": identity.expires_at})


async def delete_session(request: web.Request) -> web.Response:
    """Log out: the cookie is cleared (and, with Redis, the session deleted server-side)."""
    if not origin_allowed(request, request.config_dict[CONFIG].allowed_origins, wildcard=False):
        return json_error(403, "origin_not_allowed", "this origin may not log out")
    await end_session(request)
    return web.Response(status=204)
