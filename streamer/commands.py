"""Client-to-server WebSocket commands: parsing and validation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

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
