"""Hostile text in published events, end to end: line breaks injected into every string
field, refused timestamps, and lone UTF-16 surrogates (valid JSON, not encodable as
UTF-8) in every field."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.app_keys import BROKER
from streamer.events import EventError, TaskEvent, completed_event, progress_event

from ..clients import SseReader, ws_json
from ..conftest import PUBLISH_KEY
from ..model import expected_messages
from .conftest import ServerErrors, TokenFor, assert_still_serving

# --- Line-break injection into every string field, end to end --------------------------

INJECTIONS = [
    'x\r\nevent: task_completed\r\ndata: {"type":"forged"}\r\n\r\n',
    "a\rid: 1\rretry: 1\r\r",
    "\n\ndata: x\n: comment\n",
    "\x00\u2028\u2029\x85\ufeff",
    "tail\r",
]


async def read_until_sentinel(reader: SseReader) -> list[Any]:
    events = [await reader.next()]
    while events[-1].json["task_id"] != "sentinel":
        events.append(await reader.next())
    return events


async def test_injection_into_every_string_field_round_trips_over_sse_and_websocket(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
) -> None:
    """tests/test_bad_input.py checks one progress field at a time over SSE; this covers
    error_message, the strings (keys, values, nested) of result_data, all progress text
    fields at once with every kind of line end, and the WebSocket side too."""
    token = token_for(user_id)
    result_data = {
        "k": "a\r\nevent: forged",
        "key\r\nid: 9": "v\rdata: x",
        "nested": {"list": INJECTIONS, "deep": [{"s": "\n\n"}]},
        "\u2028": "\x85",
    }
    events = [
        progress_event(
            user_id,
            "task-a",
            progress=10,
            current_step=INJECTIONS[0],
            task_name=INJECTIONS[1],
            category=INJECTIONS[2],
            estimated_completion="2030-01-01T00:00:00Z",
        ),
        progress_event(
            user_id,
            "task-a",
            progress=20,
            current_step=INJECTIONS[3],
            task_name=INJECTIONS[4],
            category="\r\n" * 1000,
        ),
        *(
            completed_event(user_id, f"task-{n}", status="FAILURE", error_message=text)
            for n, text in enumerate(INJECTIONS)
        ),
        completed_event(user_id, "task-result", status="SUCCESS", result_data=result_data),
        completed_event(
            user_id,
            "task-both",
            status="REVOKED",
            result_data={"why": INJECTIONS[0]},
            error_message=INJECTIONS[2],
        ),
    ]
    response = await client.get(f"/sse/tasks/?token={token}")
    try:
        assert response.status == 200
        reader = SseReader(response)
        assert (await reader.next()).json["type"] == "active_tasks"
        async with client.ws_connect(f"/ws/tasks/?token={token}") as ws:
            assert (await ws_json(ws))["type"] == "active_tasks"
            broker = client.app[BROKER]
            published = [(event, await broker.publish(event)) for event in events]
            expected = expected_messages(published)
            sentinel_id = await broker.publish(progress_event(user_id, "sentinel", progress=1))

            received = await read_until_sentinel(reader)
            assert [e.json for e in received[:-1]] == expected
            assert [e.id for e in received] == [m["id"] for m in expected] + [str(sentinel_id)]
            assert [e.event for e in received[:-1]] == [m["type"] for m in expected]
            assert all(len(e.data) == 1 for e in received)
            # SseReader splits at LF only; a bare CR would also end a line for a browser.
            assert not any("\r" in line for line in reader.raw_lines)

            over_ws = [await ws_json(ws) for _ in range(len(expected) + 1)]
            assert over_ws[:-1] == expected
            assert over_ws[-1]["task_id"] == "sentinel"
    finally:
        response.close()
    assert expected[-2]["result_data"] == result_data
    assert [m.get("error_message") for m in expected[2:7]] == INJECTIONS
    assert server_errors() == []


REFUSED_TIMESTAMPS = [
    "2026-01-01T00:00:00Z\r\nevent: forged",
    "2026-01-01T00:00:00Z\n",
    "2026-01-01T00:00:00\r",
    "\n2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00\x00\r\nevent: forged",
    "2026-01-01T00:00:00Z\u2028data: x",
    "data: {}\r\n\r\n",
    # datetime.fromisoformat alone accepts these (any character between date and time,
    # a trailing NUL after an offset): the service must not.
    "2026-01-01\n12:00:00",
    "2026-01-01\r12:00:00Z",
    "2026-01-01\x0012:00",
    "2026-01-01\u202812:00",
    "2026-01-01T00:00:00Z\x00",
]


@pytest.mark.parametrize("timestamp", REFUSED_TIMESTAMPS)
async def test_line_breaks_in_estimated_completion_are_refused(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    timestamp: str,
) -> None:
    with pytest.raises(EventError, match="estimated_completion"):
        progress_event(user_id, "task", progress=1, estimated_completion=timestamp)
    response = await client.post(
        "/api/tasks/events",
        json={"user_id": user_id, "task_id": "task", "estimated_completion": timestamp},
        headers={"X-API-Key": PUBLISH_KEY},
    )
    assert response.status == 422
    assert (await response.json())["code"] == "invalid_event"
    # Nothing was stored: the user has no tasks.
    assert (await client.app[BROKER].snapshot(user_id)).tasks == []


@pytest.mark.parametrize(
    "timestamp",
    [
        "2030-01-01T10:00:00.1234567Z",  # .NET's round-trip format
        "2030-01-01T10:00:00.123456789Z",  # Go's RFC3339Nano, Java's Instant
        "2030-01-01T10:00:00.123456789+02:00",
    ],
)
async def test_timestamps_to_the_nanosecond_are_taken_as_given(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    timestamp: str,
) -> None:
    """Producers in other languages write up to nine digits of a second: refused, a
    progress update was lost."""
    response = await client.post(
        "/api/tasks/events",
        json={"user_id": user_id, "task_id": "task", "estimated_completion": timestamp},
        headers={"X-API-Key": PUBLISH_KEY},
    )
    assert response.status == 202, await response.text()
    (task,) = (await client.app[BROKER].snapshot(user_id)).tasks
    assert task["estimated_completion"] == timestamp
    with pytest.raises(EventError, match="estimated_completion"):
        progress_event(
            user_id, "t", estimated_completion=re.sub(r"\.\d+", ".1234567890", timestamp)
        )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"user_id": "USER", "task_id": "t", "progress": 1, "user_id": "other"}', "user_id"),
        ('{"user_id": "USER", "task_id": "t", "result_data": {"a": 1, "a": 2}}', "a"),
    ],
)
async def test_a_field_given_twice_is_refused_and_nothing_is_published(
    client: TestClient,  # type: ignore[type-arg]
    user_id: str,
    body: str,
    field: str,
) -> None:
    """JSON lets an object name a key twice and Python keeps the last: an event whose
    user (or any value) depends on which one counts is refused, not published."""
    response = await client.post(
        "/api/tasks/events",
        data=body.replace("USER", user_id),
        headers={"X-API-Key": PUBLISH_KEY, "Content-Type": "application/json"},
    )
    assert response.status == 422
    error = await response.json()
    assert error["code"] == "invalid_event" and repr(field) in error["message"]
    broker = client.app[BROKER]
    assert (await broker.snapshot(user_id)).tasks == []
    assert (await broker.snapshot("other")).tasks == []


async def test_a_number_too_long_for_python_is_named_as_such(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
) -> None:
    """JSON puts no bound on a number's digits; Python reads at most 4300: the body was
    answered "must be one JSON object" (400), which it is, and a WebSocket command
    "not valid JSON"."""
    huge = "9" * 4301
    response = await client.post(
        "/api/tasks/events",
        data=f'{{"user_id": "{user_id}", "task_id": "t", "processed_items": {huge}}}',
        headers={"X-API-Key": PUBLISH_KEY, "Content-Type": "application/json"},
    )
    assert response.status == 422
    assert await response.json() == {
        "type": "error",
        "code": "invalid_event",
        "message": "a number has more than 4300 digits",
    }
    assert (await client.app[BROKER].snapshot(user_id)).tasks == []
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)  # the snapshot
        await ws.send_str(f'{{"type": "ping", "n": -{huge}}}')
        error = await ws_json(ws)
        assert error["code"] == "invalid_message"
        assert error["message"] == "a number has more than 4300 digits"
        await ws.send_str(f'{{"type": "ping", "n": -{huge[1:]}}}')  # 4300 digits: taken
        assert (await ws_json(ws))["type"] == "pong"


# --- Lone UTF-16 surrogates ------------------------------------------------------------
# JSON can carry "\ud800"; no UTF-8 output can encode it. Accepted, it used to raise
# UnicodeEncodeError inside the handlers (connection dropped with 1006, traceback), and a
# stored task state with one broke every later connection of that user at the snapshot.


SURROGATE_FIELDS = ["user_id", "task_id", "current_step", "task_name", "category"]


def build_event(field: str, value: Any) -> TaskEvent:
    """An event with `value` in `field` (an id, a progress text, or a completion field)."""
    ids = {"user_id": "user-1", "task_id": "task-1"}
    if field in ids:
        return progress_event(**(ids | {field: value}), progress=1)
    if field == "error_message":
        return completed_event(**ids, status="FAILURE", error_message=value)
    if field == "result_data":
        return completed_event(**ids, result_data=value)
    return progress_event(**ids, progress=1, **{field: value})


@settings(max_examples=300, deadline=None)
@given(
    field=st.sampled_from([*SURROGATE_FIELDS, "error_message", "result_data"]),
    prefix=st.text(max_size=5),
    surrogate=st.characters(categories=["Cs"]),
    suffix=st.text(max_size=5),
    where=st.sampled_from(["key", "value", "nested"]),
)
def test_lone_surrogates_are_refused_in_every_event_field(
    field: str, prefix: str, surrogate: str, suffix: str, where: str
) -> None:
    text = prefix + surrogate + suffix
    value: Any = text
    if field == "result_data":
        value = {"key": {text: 1}, "value": {"k": text}, "nested": {"a": [{"b": text}]}}[where]
    with pytest.raises(EventError):
        build_event(field, value)


@pytest.mark.parametrize(
    "override",
    [
        *({field: "x\ud800"} for field in SURROGATE_FIELDS),
        {"status": "FAILURE", "error_message": "\udfff"},
        {"status": "SUCCESS", "result_data": {"k": "\ud800"}},
        {"status": "SUCCESS", "result_data": {"\ud800": 1}},
        {"status": "SUCCESS", "result_data": {"a": [{"b": "\udc00x"}]}},
    ],
    ids=[*SURROGATE_FIELDS, "error_message", "result_data-value", "result_data-key", "nested"],
)
async def test_lone_surrogate_in_a_published_event_is_refused(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
    override: dict[str, Any],
) -> None:
    body = json.dumps({"user_id": user_id, "task_id": "t"} | override)
    assert "\\ud" in body  # sent as a JSON escape, as any client can
    token = token_for(user_id)
    async with client.ws_connect(f"/ws/tasks/?token={token}") as live:
        await ws_json(live)
        response = await client.post(
            "/api/tasks/events",
            data=body,
            headers={"X-API-Key": PUBLISH_KEY, "Content-Type": "application/json"},
        )
        assert response.status == 422
        assert (await response.json())["code"] == "invalid_event"
        # The live connection got nothing and still answers.
        await live.send_json({"type": "ping"})
        assert await ws_json(live) == {"type": "pong"}
    assert (await client.app[BROKER].snapshot(user_id)).tasks == []
    await assert_still_serving(client, token)
    assert server_errors() == []


@pytest.mark.parametrize("task_id", [".", ".."])
async def test_a_task_id_no_url_can_name_is_refused_to_every_producer(
    client: TestClient,  # type: ignore[type-arg]
    task_id: str,
) -> None:
    """`/api/tasks/..` is `/api/` to every URL parser: such a task could never be
    asked for or cancelled over HTTP."""
    for make in (progress_event, completed_event):
        with pytest.raises(EventError, match="no URL can name it"):
            make("u", task_id)
    body = {"user_id": "u", "task_id": task_id, "progress": 1}
    answer = await client.post("/api/tasks/events", json=body, headers={"X-API-Key": PUBLISH_KEY})
    assert answer.status == 422 and "no URL can name it" in (await answer.json())["message"]
    assert (await client.post("/api/tasks/events", json=body | {"task_id": ".a"},
                              headers={"X-API-Key": PUBLISH_KEY})).status == 202  # fmt: skip
