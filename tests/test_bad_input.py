"""Malformed client input never crashes a connection or the worker."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from streamer.app_keys import BROKER
from streamer.auth.tokens import InvalidToken, issue_token, verify_token
from streamer.events import EventError, progress_event, validate_identifier

from .clients import SseReader, ws_close_code, ws_json

TokenFor = Callable[..., str]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('"ping"', "invalid_message"),
        ("null", "invalid_message"),
        ("{}", "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        ('{"type": "drop_tables"}', "unknown_type"),
        ('{"type": "get_task_status"}', "missing_task_id"),
        ('{"type": "cancel_task"}', "missing_task_id"),
        ('{"type": "get_task_status", "task_id": ["x"]}', "invalid_task_id"),
        ('{"type": "get_task_status", "task_id": ""}', "invalid_task_id"),
        ('{"type": "cancel_task", "task_id": "a\\nb"}', "invalid_task_id"),
        ("[" * 50_000, "invalid_json"),  # deep nesting, under the size limit
    ],
)
async def test_bad_commands_get_an_error_and_the_connection_stays_open(
    client: TestClient, token_for: TokenFor, user_id: str, frame: str, code: str
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_str(frame)
        error = await ws_json(ws)
        assert error["type"] == "error" and error["code"] == code and error["message"]
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_binary_frame_gets_an_error(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_bytes(b"\x00\xff" * 10)
        assert (await ws_json(ws))["code"] == "unsupported_frame"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_one_mebibyte_frame_closes_cleanly_and_the_server_keeps_serving(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        await ws.send_str('{"type": "ping", "pad": "' + "x" * (1024 * 1024) + '"}')
        assert await ws_close_code(ws) == 1009  # message too big
    async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
        await ws_json(ws)
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}


async def test_websocket_endpoint_without_upgrade(client: TestClient) -> None:
    response = await client.get("/ws/tasks/")
    assert response.status == 400


EVIL = 'x\r\nevent: task_completed\r\ndata: {"type":"forged"}\n\nid: 1\rretry: 1'


@pytest.mark.parametrize("field", ["current_step", "task_name", "category"])
async def test_newlines_in_event_fields_cannot_inject_sse_fields(
    client: TestClient, token_for: TokenFor, user_id: str, field: str
) -> None:
    fields: dict[str, object] = {"progress": 10, "current_step": "ok", "task_name": "ok"}
    fields[field] = EVIL
    response = await client.get(f"/sse/tasks/?token={token_for(user_id)}")
    reader = SseReader(response)
    await reader.next()
    broker = client.app[BROKER]
    await broker.publish(progress_event(user_id, "task", **fields))
    await broker.publish(progress_event(user_id, "sentinel", progress=1))
    events = [await reader.next(), await reader.next()]
    # Exactly the two published events, each a single data line of JSON; SseReader
    # fails on any field other than id, event, data and retry.
    assert [e.event for e in events] == ["task_progress", "task_progress"]
    assert [e.json["task_id"] for e in events] == ["task", "sentinel"]
    assert all(len(e.data) == 1 for e in events)
    assert events[0].json[field] == EVIL
    response.close()


def test_control_characters_are_refused_in_ids() -> None:
    for bad in (EVIL, "a\nb", "a\rb", "a\x00b", "a\x7fb"):
        with pytest.raises(EventError):
            progress_event("user", bad, progress=1)
        with pytest.raises(EventError):
            progress_event(bad, "task", progress=1)


@pytest.mark.parametrize(
    "user_id",
    ["42", "é", "a b", "ünïcode ✓", "a\u00a0b", "\u202eevil", "a\x85b", "a\u2028b", "a\u200bb"],
)
def test_an_id_is_valid_where_a_token_can_carry_it(user_id: str) -> None:
    """A publisher must not accept a user id that no token can name: its events would be
    stored for nobody (a no-break space, a right-to-left override, C1 controls...)."""
    secret = "s" * 40
    try:
        validate_identifier("user_id", user_id)
    except EventError:
        accepted = False
    else:
        accepted = True
    try:
        verify_token(secret, issue_token(secret, user_id))
    except InvalidToken:
        verifiable = False
    else:
        verifiable = True
    assert accepted == verifiable
    assert accepted == (user_id in ("42", "é", "a b", "ünïcode ✓"))


async def test_bad_last_event_ids_are_answered_with_a_fresh_snapshot(
    client: TestClient, token_for: TokenFor, user_id: str
) -> None:
    too_big = "deadbeef-99999999999999999999-0"  # not a Redis stream id (over 2**64)
    for bad in ("0", "zzzz-1-1", "deadbeef-99999999999999999-0", too_big, "x" * 5000, "\u00e9"):
        async with client.ws_connect(
            "/ws/tasks/", params={"token": token_for(user_id), "last_event_id": bad}
        ) as ws:
            snapshot = await ws_json(ws)
            assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
    message = await client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}")
    assert (await message.receive()).type == WSMsgType.TEXT
    await message.close()
