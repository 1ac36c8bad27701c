"""Django side of streamer (`pip install streamer[django]`): the view behind
`STREAMER_AUTH_URL`, so the tokens and sessions an app already has open streams, and a
helper that mints streamer tokens for apps that prefer them.

urls.py::

    from streamer.integrations.django import streamer_auth_view, streamer_token_view

    urlpatterns += [
        path("streamer/auth/", streamer_auth_view),    # STREAMER_AUTH_URL points here
        path("streamer/token/", streamer_token_view),  # optional: streamer tokens
    ]

Django settings read here:

- `STREAMER_SECRET`: the service's secret, for `streamer_token` (same value as the
  service's `STREAMER_SECRET`).
- `STREAMER_TOKEN_TTL`: seconds a minted token lives (default 3600).
- `STREAMER_USER_ID_FIELD`: the user attribute that is the streamer user id
  (default `"pk"`: the id Channels consumers used as `user.id`).
- `STREAMER_AUTH_MAX_AGE`: seconds (at least 1) a stream admitted by a REST framework
  token may live before it must authenticate again (default: unset, those tokens do
  not expire).

A user whose streamer user id is longer than streamer takes (200 characters) is refused
(403); `streamer_token` raises ValueError for a visitor who is not logged in or a user
who is not active.

The auth view answers only what streamer sends it; serve it on the internal network
(it is CSRF-exempt: streamer posts the credentials in the body, not as cookies).
"""

from __future__ import annotations

import json
from importlib import import_module
from typing import Any

from django.conf import settings
from django.contrib.auth import decorators, get_user
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.cookie import parse_cookie
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from ..auth.delegated import MAX_EXPIRES_IN_S, MAX_USER_ID_LENGTH
from ..auth.tokens import MAX_TOKEN_LENGTH, issue_token

__all__ = ["streamer_auth_view", "streamer_token", "streamer_token_view", "streamer_user_id"]

MAX_COOKIE_LENGTH = 16 * 1024

# Django 5.1+ `LoginRequiredMiddleware` redirects every view not marked with this to the
# login page: streamer would take the auth view's redirect for an outage (503 / 1013),
# and a page's fetch of a token would get the login page. Both views answer for
# themselves.
_answers_for_itself = getattr(decorators, "login_not_required", lambda view: view)


def streamer_user_id(user: Any) -> str:
    """The streamer user id of a Django user (`STREAMER_USER_ID_FIELD`, default pk).
    Raises ValueError where the field is empty (None, a blank email): every such user
    would share one identity, or streamer would take the answer for an outage."""
    field = getattr(settings, "STREAMER_USER_ID_FIELD", "pk")
    value = getattr(user, field)
    text = "" if value is None else str(value)
    if not text.strip() or not text.isprintable():
        raise ValueError(f"this user cannot stream: their {field} ({value!r}) is no user id")
    if len(text) > MAX_USER_ID_LENGTH:  # streamer would refuse its tokens, its answers
        raise ValueError(f"user ids longer than {MAX_USER_ID_LENGTH} characters cannot stream")
    return text


def streamer_token(user: Any, ttl_s: int | None = None) -> str:
    """A streamer access token for `user`, signed with `settings.STREAMER_SECRET`.
    Raises ValueError for a user who is not logged in or not active (an anonymous
    user's id, None, would be one identity shared by every visitor), or who has no user
    id (`streamer_user_id`)."""
    if not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        raise ValueError("streamer tokens are for logged-in, active users")
    ttl = ttl_s if ttl_s is not None else int(getattr(settings, "STREAMER_TOKEN_TTL", 3600))
    return issue_token(settings.STREAMER_SECRET, streamer_user_id(user), ttl)


@_answers_for_itself
@require_GET
def streamer_token_view(request: HttpRequest) -> HttpResponse:
    """`{"token": ...}` for the logged-in user: for pages that connect with a token.
    401 `{"error": "unauthorized"}` when no one is logged in (not a redirect to the
    login page, whose HTML a page's fetch would take for the answer)."""
    if not request.user.is_authenticated or not request.user.is_active:
        response = _error(401, "unauthorized")
    else:
        try:
            response = JsonResponse({"token": streamer_token(request.user)})
        except ValueError as exc:
            response = _error(403, str(exc))
    response["Cache-Control"] = "no-store"
    return response


@_answers_for_itself
@csrf_exempt
@require_POST
def streamer_auth_view(request: HttpRequest) -> HttpResponse:
    """Checks the credentials streamer forwards: `{"token": ..., "cookie": ...}`.

    200 `{"user_id": ..., "expires_in"?: ...}` for an active user, 401 otherwise, 400
    for a body that is not what streamer sends.
    """
    try:
        body = json.loads(request.body)
    except (ValueError, RecursionError):  # RecursionError: nested past Python's limit
        return _error(400, "the body must be JSON")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    token, cookie = body.get("token"), body.get("cookie")
    if not _optional_text(token, MAX_TOKEN_LENGTH) or not _optional_text(cookie, MAX_COOKIE_LENGTH):
        return _error(400, "token and cookie must be strings or null")
    user, expires_in = None, None
    if token:
        user = _user_from_rest_framework_token(token)
        max_age = getattr(settings, "STREAMER_AUTH_MAX_AGE", None)
        expires_in = int(max_age) if max_age is not None else None
        if expires_in is not None and expires_in < 1:
            raise ImproperlyConfigured(
                f"STREAMER_AUTH_MAX_AGE must be at least 1 second, got {max_age!r}"
            )
    if user is None and cookie:
        user, expires_in = _user_from_session_cookie(cookie)
    if user is None or not user.is_active:
        return _error(401, "unauthorized")
    try:
        user_id = streamer_user_id(user)
    except ValueError as exc:  # streamer would take the answer for an outage
        return _error(403, str(exc))
    answer: dict[str, object] = {"user_id": user_id}
    if expires_in is not None:
        # At most what streamer takes (a session cookie of decades must not shut
        # everyone out).
        answer["expires_in"] = min(expires_in, MAX_EXPIRES_IN_S)
    return JsonResponse(answer)


def _optional_text(value: object, max_length: int) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= max_length)


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _user_from_rest_framework_token(key: str) -> Any:
    """The user of a Django REST framework token, or None (also without the app)."""
    if "rest_framework.authtoken" not in settings.INSTALLED_APPS:
        return None
    from rest_framework.authentication import TokenAuthentication
    from rest_framework.exceptions import AuthenticationFailed

    try:
        user, _ = TokenAuthentication().authenticate_credentials(key)
    except AuthenticationFailed:
        return None
    return user


def _user_from_session_cookie(cookie: str) -> tuple[Any, int | None]:
    """The user of the Django session named in a Cookie header, checked as Django checks
    it on a request (session expiry, the password hash the session was made with)."""
    session_key = parse_cookie(cookie).get(settings.SESSION_COOKIE_NAME)
    if not session_key:
        return None, None
    engine = import_module(settings.SESSION_ENGINE)
    request = HttpRequest()
    request.session = engine.SessionStore(session_key)
    user = get_user(request)
    if not user.is_authenticated:
        return None, None
    return user, max(_seconds_left(request.session), 1)


def _seconds_left(session: Any) -> int:
    """Until the session expires. SessionStore.get_expiry_age() counts from now, as for
    a session being saved; the database engines (Django's default, and cached_db) keep
    when a stored session expires, which is what a stream must not outlive."""
    model = getattr(session, "get_model_class", None)
    if callable(model):
        rows = model().objects.filter(session_key=session.session_key)
        expires = rows.values_list("expire_date", flat=True).first()
        if expires is not None:
            return int((expires - timezone.now()).total_seconds())
    return int(session.get_expiry_age())
