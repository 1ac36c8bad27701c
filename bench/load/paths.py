"""Where a client of each server subscribes: streamer wants a token, the reference a user."""

from __future__ import annotations

from functools import cache

from streamer.auth.tokens import issue_token

ENDPOINTS = {"ws": "/ws/tasks/", "sse": "/sse/tasks/"}
TOKEN_TTL_S = 3600


@cache
def _token(secret: str, user: str) -> str:
    return issue_token(secret, user, ttl_s=TOKEN_TTL_S)


def stream_path(server: str, transport: str, user: str, secret: str) -> str:
    endpoint = ENDPOINTS[transport]
    if server == "streamer":
        return f"{endpoint}?token={_token(secret, user)}"
    return f"{endpoint}?user={user}"
