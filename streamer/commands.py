"""Client commands: parsing, validation and what each one does.

One implementation for both ways in: WebSocket text frames (`answer`) and the HTTP
endpoints under /api/tasks/ (`handlers/api.py`), which build the same `Command` with
`make_command` and run it with `execute`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import json_input, wire
from .broker.base import Broker, BrokerUnavailable, Snapshot
from .events import EventError, validate_task_id
from .reasons import BROKER_UNAVAILABLE_MESSAGE

CommandType = Literal["get_task_status", "get_active_tasks", "cancel_task", "ping"]
_NEEDS_TASK_ID = frozenset({"get_task_status", "cancel_task"})
_KNOWN = frozenset({"get_task_status", "get_active_tasks", "cancel_task", "ping"})

# A reply costs one command, plus one more per this many bytes (a large snapshot).
REPLY_BYTES_PER_COMMAND = 16 * 1024
BROKER_UNAVAILABLE = wire.error("broker_unavailable", BROKER_UNAVAILABLE_MESSAGE)


@dataclass(frozen=True)
class Command:
    type: CommandType
    task_id: str | None = None


@dataclass(frozen=True)
class CommandError(Exception):
    code: str
    message: str


def parse_command(text: str) -> Command:
    """Parse one text frame; raise CommandError with a code the client can act on."""
    try:
        message = json_input.loads(text)
    except json_input.RefusedValue as exc:
        raise CommandError("invalid_message", str(exc)) from None
    except (ValueError, RecursionError):
        raise CommandError("invalid_json", "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise CommandError("invalid_message", "message must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise CommandError("invalid_message", "message needs a string field 'type'")
    if kind not in _KNOWN:
        raise CommandError("unknown_type", f"unknown message type {kind[:50]!r}")
    if kind in _NEEDS_TASK_ID and "task_id" not in message:
        raise CommandError("missing_task_id", f"{kind} needs a 'task_id'")
    return make_command(kind, message.get("task_id"))  # type: ignore[arg-type]


def make_command(kind: CommandType, task_id: object = None) -> Command:
    """A command of a known type; its task id is validated as every task id is."""
    if kind not in _NEEDS_TASK_ID:
        return Command(type=kind)
    try:
        return Command(type=kind, task_id=validate_task_id(task_id))
    except EventError as exc:
        raise CommandError("invalid_task_id", str(exc)) from None


# A reply: a message, or a snapshot for the transport to send at the client's position.
Reply = str | Snapshot


def read_command(text: str) -> Command | str:
    """The command in a text frame, or the `error` message to send back."""
    try:
        return parse_command(text)
    except CommandError as exc:
        return wire.error(exc.code, exc.message)


async def answer(broker: Broker, user_id: str, command: Command) -> str:
    """The reply to a command other than `get_active_tasks` (a snapshot, which the
    connection sends in order with the events around it); a broker outage is an
    `error`."""
    try:
        reply = await execute(broker, user_id, command)
    except BrokerUnavailable:
        return BROKER_UNAVAILABLE
    assert isinstance(reply, str), "get_active_tasks is the connection's to answer"
    return reply


async def execute(broker: Broker, user_id: str, command: Command) -> Reply:
    """Run a command for the user; raises BrokerUnavailable."""
    return (await run(broker, user_id, command)).reply


@dataclass(frozen=True)
class Outcome:
    """A command's reply, and whether its task was found: False when it is unknown or
    another user's (the two are never told apart)."""

    reply: Reply
    found: bool = True


async def run(broker: Broker, user_id: str, command: Command) -> Outcome:
    """Run a command for the user; raises BrokerUnavailable."""
    if command.type == "ping":
        return Outcome(wire.PONG)
    if command.type == "get_active_tasks":
        return Outcome(await broker.snapshot(user_id))
    assert command.task_id is not None
    if command.type == "get_task_status":
        state = await broker.task_state(user_id, command.task_id)
        return Outcome(wire.task_status(command.task_id, state), found=state is not None)
    success = await broker.request_cancel(user_id, command.task_id)
    return Outcome(wire.task_cancelled(command.task_id, success))


def reply_cost(size: int) -> int:
    """Commands a reply of `size` bytes costs beyond the one that asked for it: one per
    16 KiB."""
    return size // REPLY_BYTES_PER_COMMAND
