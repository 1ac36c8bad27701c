"""Property-based fuzzing of the WebSocket command parser, and a command carrying a lone
UTF-16 surrogate on a live connection."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streamer.commands import Command, CommandError, parse_command
from streamer.events import MAX_ID_LENGTH

from ..clients import ws_json
from .conftest import ServerErrors, TokenFor

# --- parse_command never raises anything but CommandError ------------------------------

COMMAND_TYPES = ("get_task_status", "get_active_tasks", "cancel_task", "ping")
NEEDS_TASK_ID = frozenset({"get_task_status", "cancel_task"})
ERROR_CODES = frozenset(
    {"invalid_json", "invalid_message", "unknown_type", "missing_task_id", "invalid_task_id"}
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

task_id_values = st.one_of(
    json_values,
    st.text(),
    st.integers(),
    st.text(min_size=MAX_ID_LENGTH - 2, max_size=MAX_ID_LENGTH + 2),
    st.sampled_from(
        [
            "",
            " ",
            "a b",
            "a\nb",
            "a\rb",
            "\x00",
            "\x1f",
            "\x7f",
            "\x85",
            "\u2028",
            "é",
            "a\u00a0b",
            "\u202e",
        ]
    ),
    # Lone UTF-16 surrogates: valid in JSON ("\ud800"), not encodable as UTF-8.
    st.lists(st.characters(categories=["Cs"]) | st.characters(), min_size=1, max_size=8).map(
        "".join
    ),
)


def unprintable(ch: str) -> bool:
    """Control, format, surrogate, private-use, unassigned, or a separator other than
    the space: what no id (nor a token's subject) may hold."""
    category = unicodedata.category(ch)
    return category in UNPRINTABLE or (category == "Zs" and ch != " ")


UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def check_command(text: str) -> Command | CommandError:
    """Run the parser and check the invariants; any other exception fails the test."""
    try:
        command = parse_command(text)
    except CommandError as exc:
        assert isinstance(exc.code, str) and exc.code in ERROR_CODES
        assert isinstance(exc.message, str) and exc.message
        return exc
    assert isinstance(command, Command)
    assert command.type in COMMAND_TYPES
    if command.type in NEEDS_TASK_ID:
        assert isinstance(command.task_id, str)
        assert 1 <= len(command.task_id) <= MAX_ID_LENGTH
        assert not any(unprintable(ch) for ch in command.task_id)
        command.task_id.encode("utf-8")  # the reply echoes it: it must be sendable
    else:
        assert command.task_id is None
    return command


@settings(max_examples=300, deadline=None)
@given(text=st.text())
@example(text="")
@example(text="[" * 100_000)  # deeper than the recursion limit
@example(text='{"type": "ping"}')
@example(text='{"type": "cancel_task", "task_id": "\\u0000"}')
@example(text="NaN")
def test_parse_command_on_arbitrary_text(text: str) -> None:
    check_command(text)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_parse_command_on_arbitrary_json(value: object) -> None:
    outcome = check_command(json.dumps(value))
    if not isinstance(value, dict):
        assert isinstance(outcome, CommandError) and outcome.code == "invalid_message"


def expected_task_id(value: object) -> str | None:
    """The contract for ids: non-empty strings of printable characters (numbers become
    their decimal string); None when the value must be refused."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LENGTH:
        return None
    if any(unprintable(ch) for ch in value):
        return None
    return value


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(COMMAND_TYPES),
    task_id=task_id_values,
    extra=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_parse_command_on_known_types_with_random_task_ids(
    kind: str, task_id: object, extra: dict[str, Any]
) -> None:
    message = {**extra, "type": kind, "task_id": task_id}
    outcome = check_command(json.dumps(message))
    if kind not in NEEDS_TASK_ID:
        assert outcome == Command(type=kind)  # type: ignore[arg-type]
        return
    # What the server sees is the value after the JSON round trip, where an escaped
    # surrogate *pair* ("\ud800\udc00") becomes one valid character.
    expected = expected_task_id(json.loads(json.dumps(task_id)))
    if expected is None:
        assert isinstance(outcome, CommandError) and outcome.code == "invalid_task_id"
    else:
        assert outcome == Command(type=kind, task_id=expected)  # type: ignore[arg-type]


# --- Lone UTF-16 surrogates ------------------------------------------------------------
# JSON can carry "\ud800"; no UTF-8 output can encode it. Accepted, it used to raise
# UnicodeEncodeError inside the handlers (connection dropped with 1006, traceback), and a
# stored task state with one broke every later connection of that user at the snapshot.


@pytest.mark.parametrize("kind", ["get_task_status", "cancel_task"])
async def test_lone_surrogate_task_id_in_a_command_gets_an_error(
    client: TestClient,  # type: ignore[type-arg]
    token_for: TokenFor,
    user_id: str,
    server_errors: ServerErrors,
    kind: str,
) -> None:
    async with client.ws_connect(f"/ws/tasks/?token={token_for(user_id)}") as ws:
        await ws_json(ws)
        await ws.send_str('{"type": "' + kind + '", "task_id": "\\ud800"}')
        error = await ws_json(ws)
        assert error["type"] == "error" and error["code"] == "invalid_task_id"
        await ws.send_json({"type": "ping"})
        assert await ws_json(ws) == {"type": "pong"}
    assert server_errors() == []
