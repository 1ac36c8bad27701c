"""SSE framing of hostile text: whatever a producer puts in an event's strings, each
event is one SSE block with one data line, parsed per the HTML rules."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.events import (
    MAX_TEXT_LENGTH,
    TaskEvent,
    completed_event,
    full_task_state,
    progress_event,
)
from streamer.wire import Delivery, EventId, with_id

from ..model import expected_messages


def event_json(event: TaskEvent) -> str:
    """The event's JSON as a broker writes it for a task without a state before it."""
    return event.to_json(full_task_state(event.state_update().apply({})))


# --- SSE framing of hostile text, parsed per the HTML rules ----------------------------

EVENT_ID = "deadbeef-1-0"
SSE_LINE_END = re.compile(r"\r\n|\r|\n")
FRAGMENTS = [
    "\r",
    "\n",
    "\r\n",
    "\n\n",
    "\r\r",
    "\x00",
    "\u2028",
    "\u2029",
    "\x85",
    "\ufeff",
    "data: x",
    "event: y",
    "id: 1",
    "retry: 1",
    ": comment",
    ":",
    "\\",
    '"',
    "\\r\\n",
]
hostile_text = st.one_of(
    st.text(max_size=MAX_TEXT_LENGTH),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=40).map("".join),
)


def sse_bytes(event: TaskEvent) -> tuple[bytes, str]:
    """The body bytes the server writes for one event on every SSE stream (its
    pre-encoded chunk, with the HTTP/1.1 chunk framing taken off), and its JSON."""
    event_id = EventId.parse(EVENT_ID)
    assert event_id is not None
    delivery = Delivery(
        "user-1", event.task_id, event_id, event.type, with_id(event_json(event), event_id)
    )
    size, _, rest = delivery.sse_chunk.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and len(rest) == int(size, 16) + 2
    return rest[:-2], delivery.json.decode()


def parse_sse(raw: bytes) -> list[list[tuple[str, str]]]:
    """The fields of each dispatched block, per the HTML "interpreting an event stream"
    rules: lines end at CRLF, CR or LF; `name: value` (one leading space dropped); a line
    without a colon is a field with an empty value; comments are kept as (":", text)."""
    lines = SSE_LINE_END.split(raw.decode("utf-8"))
    assert lines.pop() == "", "the stream ends in the middle of a line"
    blocks: list[list[tuple[str, str]]] = []
    fields: list[tuple[str, str]] = []
    for line in lines:
        if line == "":
            blocks.append(fields)
            fields = []
        elif line.startswith(":"):
            fields.append((":", line[1:]))
        else:
            name, _, value = line.partition(":")
            fields.append((name, value.removeprefix(" ")))
    assert fields == [], f"fields after the last blank line: {fields!r}"
    return blocks


async def assert_one_clean_sse_block(event: TaskEvent) -> dict[str, Any]:
    body, wire = sse_bytes(event)
    blocks = parse_sse(body)
    assert len(blocks) == 1
    assert blocks[0] == [("id", EVENT_ID), ("event", event.type), ("data", wire)]
    decoded: dict[str, Any] = json.loads(blocks[0][2][1])
    event_id = EventId.parse(EVENT_ID)
    assert event_id is not None
    assert [decoded] == expected_messages([(event, event_id)])
    return decoded


@settings(max_examples=300, deadline=None)
@given(
    current_step=hostile_text,
    task_name=hostile_text,
    category=hostile_text,
    error_message=hostile_text,
    result_text=hostile_text,
)
@example(
    current_step='x\r\nevent: task_completed\r\ndata: {"type":"forged"}\n\nid: 1\rretry: 1',
    task_name="\u2028\x85\x00",
    category="\r",
    error_message="\n\ndata: x",
    result_text="a\r\nevent: forged",
)
@example(
    current_step="\r\n" * (MAX_TEXT_LENGTH // 2),
    task_name="\n" * MAX_TEXT_LENGTH,
    category="\r" * MAX_TEXT_LENGTH,
    error_message="\u2028" * MAX_TEXT_LENGTH,
    result_text="\x85" * MAX_TEXT_LENGTH,
)
async def test_sse_framing_of_hostile_text_is_one_event_with_one_data_line(
    current_step: str, task_name: str, category: str, error_message: str, result_text: str
) -> None:
    progress = progress_event(
        "user-1",
        "task-1",
        progress=50,
        current_step=current_step,
        task_name=task_name,
        category=category,
    )
    decoded = await assert_one_clean_sse_block(progress)
    assert (decoded["current_step"], decoded["task_name"], decoded["category"]) == (
        current_step,
        task_name,
        category,
    )

    result_data = {"k": result_text, result_text: [result_text, {"nested": result_text}]}
    completed = completed_event(
        "user-1",
        "task-1",
        status="FAILURE",
        result_data=result_data,
        error_message=error_message,
    )
    decoded = await assert_one_clean_sse_block(completed)
    assert decoded["error_message"] == error_message
    assert decoded["result_data"] == result_data
