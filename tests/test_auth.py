"""Credentials on both transports, token expiry, origins, and per-user isolation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable

import jwt
import pytest
from aiohttp import WSServerHandshakeError
from aiohttp.test_utils import TestClient

from streamer.app_keys import BROKER
from streamer.auth.tokens import InvalidToken, issue_token, verify_token
from streamer.events import progress_event

from .clients import SseReader, ws_close_code, ws_json
from .conftest import SECRET

TokenFor = Callable[..., str]


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _signed(claims: dict[str, object]) -> str:
    """An HS256 token signed with the right secret, whatever its claims."""
    signing_input = _b64({"alg": "HS256", "typ": "JWT"}) + "." + _b64(claims)
    digest = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_signed_helper_makes_valid_tokens() -> None:
    assert verify_token(SECRET, _signed({"sub": "7", "exp": int(time.time()) + 60})).user_id == "7"


def bad_tokens() -> dict[str, str]:
    now = int(time.time())
    claims = {"sub": "victim", "exp": now + 3600}
    return {
        "garbage": "not-a-token",
        "wrong_secret": jwt.encode(claims, "another-secret-" + "y" * 40, algorithm="HS256"),
        "expired": jwt.encode({"sub": "victim", "exp": now - 10}, SECRET, algorithm="HS256"),
        "alg_none": _b64({"alg": "none", "typ": "JWT"}) + "." + _b64(claims) + ".",
        "no_exp": jwt.encode({"sub": "victim"}, SECRET, algorithm="HS256"),
        "no_sub": jwt.encode({"exp": now + 3600}, SECRET, algorithm="HS256"),
        "hs512": jwt.encode(claims, SECRET, algorithm="HS512"),
        # Algorithm confusion: an RS256 header over an HMAC made with the secret.
        "rs256_confusion": _b64({"alg": "RS256", "typ": "JWT"})
        + "."
        + _b64(claims)
        + "."
        + base64.urlsafe_b64encode(
            hmac.new(
                SECRET.encode(),
                (_b64({"alg": "RS256", "typ": "JWT"}) + "." + _b64(claims)).encode(),
                hashlib.sha256,
            ).digest()
        )
        .rstrip(b"=")
        .decode(),
        "numeric_sub": _signed({"sub": 1, "exp": now + 3600}),
    }


@pytest.mark.parametrize("kind", sorted(bad_tokens()))
def test_verify_token_refuses(kind: str) -> None:
    with pytest.raises(InvalidToken):
        verify_token(SECRET, bad_tokens()[kind])


def test_issue_and_verify_round_trip() -> None:
    identity = verify_token(SECRET, issue_token(SECRET, "42", ttl_s=60))
    assert identity.user_id == "42"
    assert time.time() < identity.expires_at <= time.time() + 61


@pytest.mark.parametrize("kind", [*sorted(bad_tokens()), "missing"])
async def test_sse_refuses_bad_credentials_with_401(client: TestClient, kind: str) -> None:
    headers = {} if kind == "missing" else {"Authorization": f"Bearer {bad_tokens()[kind]}"}
    response = await client.get("/sse/tasks/", headers=headers)
    assert response.status == 401
    body = await response.json()
    assert body["type"] == "error" and body["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("kind", [*sorted(bad_tokens()), "missing"])
async def test_websocket_refuses_bad_credentials_with_4401(client: TestClient, kind: str) -> None:
    query = "" if kind == "missing" else f"?token={bad_tokens()[kind]}"
    async with client.ws_connect(f"/ws/tasks/{query}") as ws:
        assert await ws_close_code(ws) == 4401


async def test_malformed_authorization_header(client: TestClient, token_for: TokenFor) -> None:
    response = await client.get("/sse/tasks/", headers={"Authorization": f"Basic {token_for('u')}"})
    assert response.status == 401


async def test_header_wins_over_query(client: TestClient, token_for: TokenFor) -> None:
    response = await client.get(
        f"/sse/tasks/?token={token_for('query-user')}",
        headers={"Authorization": "Bearer not-a-token"},
    )
    assert response.status == 401


async def test_token_expiring_while_connected_ends_both_transports(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id, ttl_s=5)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        sse = await client.get(f"/sse/tasks/?token={token}")
        reader = SseReader(sse)
        await ws_json(ws)
        await reader.next()
        assert await ws_close_code(ws, timeout=10) == 4401

        async def until_end() -> None:
            while True:
                await reader.next(timeout=10)

        with pytest.raises(EOFError):
            await asyncio.wait_for(until_end(), 10)


async def test_websocket_from_foreign_origin_is_refused(
    client: TestClient, token_for: TokenFor
) -> None:
    with pytest.raises(WSServerHandshakeError) as refused:
        await client.ws_connect(
            f"/ws/tasks/?token={token_for('u')}", headers={"Origin": "https://evil.example"}
        )
    assert refused.value.status == 403
    same_origin = f"http://{client.host}:{client.port}"
    async with client.ws_connect(
        f"/ws/tasks/?token={token_for('u')}", headers={"Origin": same_origin}
    ) as ws:
        assert (await ws_json(ws))["type"] == "active_tasks"


async def test_users_never_see_each_others_tasks(client: TestClient, token_for: TokenFor) -> None:
    broker = client.app[BROKER]
    alice, bob = "alice", "bob"
    await broker.publish(progress_event(bob, "bob-task", progress=10))
    async with (
        client.ws_connect(f"/ws/tasks/?token={token_for(alice)}") as alice_ws,
        client.ws_connect(f"/ws/tasks/?token={token_for(bob)}") as bob_ws,
    ):
        alice_sse = SseReader(await client.get(f"/sse/tasks/?token={token_for(alice)}"))
        assert (await ws_json(alice_ws))["tasks"] == []
        assert (await alice_sse.next()).json["tasks"] == []
        assert [t["task_id"] for t in (await ws_json(bob_ws))["tasks"]] == ["bob-task"]

        for step in range(5):
            await broker.publish(progress_event(bob, "bob-task", progress=20 + step))
        alice_id = str(await broker.publish(progress_event(alice, "alice-task", progress=1)))
        # Alice's first event is her own: none of Bob's five came before it.
        assert (await ws_json(alice_ws))["id"] == alice_id
        assert (await alice_sse.next()).id == alice_id
        bob_events = [await ws_json(bob_ws) for _ in range(5)]
        assert {e["task_id"] for e in bob_events} == {"bob-task"}

        for command in ({"type": "get_task_status", "task_id": "bob-task"},):
            await alice_ws.send_json(command)
            assert await ws_json(alice_ws) == {
                "type": "task_status", "task_id": "bob-task", "status": None,
            }  # fmt: skip
        await alice_ws.send_json({"type": "cancel_task", "task_id": "bob-task"})
        assert await ws_json(alice_ws) == {
            "type": "task_cancelled", "task_id": "bob-task", "success": False,
        }  # fmt: skip
        assert not await broker.is_cancelled(bob, "bob-task")

        # Alice asking for Bob's task by filter sees nothing of it either.
        async with client.ws_connect(
            f"/ws/tasks/?token={token_for(alice)}&task_id=bob-task"
        ) as spy:
            assert (await ws_json(spy))["tasks"] == []
            await broker.publish(progress_event(bob, "bob-task", progress=90))
            await spy.send_json({"type": "ping"})
            assert await ws_json(spy) == {"type": "pong"}
