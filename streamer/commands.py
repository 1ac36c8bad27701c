"""Client-to-server commands: parsing, validation and what each one does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from . import wire
from .broker.base import Broker, BrokerUnavailable, Snapshot
from .events import EventError, validate_identifier

CommandType = Literal["get_task_status", "get_active_tasks", "cancel_task", "ping"]
_NEEDS_TASK_ID = frozenset({"get_task_status", "cancel_task"})
_KNOWN = frozenset({"get_task_status", "get_active_tasks", "cancel_task", "ping"})


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
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise CommandError("invalid_json", "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise CommandError("invalid_message", "message must be a JSON object")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise CommandError("invalid_message", "message needs a string field 'type'")
    if kind not in _KNOWN:
        raise CommandError("unknown_type", f"unknown message type {kind[:50]!r}")
    task_id: str | None = None
    if kind in _NEEDS_TASK_ID:
        if "task_id" not in message:
            raise CommandError("missing_task_id", f"{kind} needs a 'task_id'")
        try:
            task_id = validate_identifier("task_id", message["task_id"])
        except EventError as exc:
            raise CommandError("invalid_task_id", str(exc)) from None
    return Command(type=kind, task_id=task_id)  # type: ignore[arg-type]


# A reply: a message, or a snapshot for the transport to send at the client's position.
Reply = str | Snapshot


async def answer(broker: Broker, user_id: str, text: str) -> Reply:
    """The reply to one command frame; bad input and broker outages are `error`s."""
    try:
        command = parse_command(text)
    except CommandError as exc:
        return wire.error(exc.code, exc.message)
    try:
        return await execute(broker, user_id, command)
    except BrokerUnavailable:
        return wire.error("broker_unavailable", "the broker is unavailable; try again")


async def execute(broker: Broker, user_id: str, command: Command) -> Reply:
    if command.type == "ping":
        return wire.PONG
    if command.type == "get_active_tasks":
        return await broker.snapshot(user_id)
    assert command.task_id is not None
    if command.type == "get_task_status":
        return wire.task_status(command.task_id, await broker.task_state(user_id, command.task_id))
    success = await broker.request_cancel(user_id, command.task_id)
    return wire.task_cancelled(command.task_id, success)
