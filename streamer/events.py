"""The event model: what producers publish, what clients receive, and event ids.

Everything a producer sends is validated here, once, whichever way it arrives
(Python publisher, CLI, HTTP), so the brokers only ever store well-formed events.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any, Literal

PROGRESS_STATUSES = frozenset({"PENDING", "STARTED", "PROGRESS", "RETRY"})
TERMINAL_STATUSES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
RUNNING_STATUSES = frozenset({"STARTED", "PROGRESS", "RETRY"})

EventType = Literal["task_progress", "task_completed"]

MAX_ID_LENGTH = 200
MAX_TEXT_LENGTH = 2000
MAX_RESULT_BYTES = 64 * 1024
# Deep enough for any real result, shallow enough that no JSON library on any path
# (ours, Redis's cjson, a browser's) comes near its recursion limit.
MAX_JSON_DEPTH = 32
# Counts stay exact in JavaScript clients (Number.MAX_SAFE_INTEGER).
MAX_COUNT = 2**53 - 1

TASK_STATE_FIELDS = (
    "task_id",
    "task_name",
    "category",
    "status",
    "progress",
    "current_step",
    "processed_items",
    "total_items",
    "created_at",
    "started_at",
    "completed_at",
    "estimated_completion",
    "result_data",
    "error_message",
)

TaskState = dict[str, Any]


class EventError(ValueError):
    """A published event is malformed; the message says which field and why."""


_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def dumps(value: Any) -> str:
    """Compact one-line JSON; newlines inside strings are escaped, so SSE framing is safe.

    The same text as `json.dumps` with these settings; strings, numbers and None, most of
    what events carry, skip the encoder (publishing encodes every field of every event).
    """
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _ENCODE(value)


def utc_now_iso() -> str:
    """`datetime.now(UTC).isoformat()` with a Z: microseconds, none when zero."""
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    microseconds = nanoseconds // 1000
    whole = _whole_second(seconds)
    return f"{whole}.{microseconds:06d}Z" if microseconds else f"{whole}Z"


@functools.lru_cache(maxsize=1)  # every event stamps one: the date part changes once a second
def _whole_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _require_unicode(name: str, value: str) -> None:
    """JSON can carry lone surrogates ("\\ud800") that no UTF-8 output can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError(f"{name} must be valid Unicode text (no lone surrogates)") from None


def validate_identifier(name: str, value: object) -> str:
    """User and task ids: non-empty strings of printable characters (numbers become their
    decimal string, UUIDs, as Django's UUID primary keys, their usual text). Printable
    as tokens' subjects must be: no control, format (such as a right-to-left override)
    or separator characters other than the space, and no lone surrogates."""
    if isinstance(value, bool):
        raise EventError(f"{name} must be a string, got a boolean")
    if isinstance(value, int) and abs(value) >= 10**MAX_ID_LENGTH:
        raise EventError(f"{name} must be 1 to {MAX_ID_LENGTH} characters long")
    if isinstance(value, int | uuid.UUID):
        value = str(value)
    if not isinstance(value, str):
        raise EventError(f"{name} must be a string")
    if not value or len(value) > MAX_ID_LENGTH:
        raise EventError(f"{name} must be 1 to {MAX_ID_LENGTH} characters long")
    if not value.isprintable():
        _require_unicode(name, value)
        raise EventError(f"{name} must be printable: no control, format or separator characters")
    return value


def validate_task_id(value: object, name: str = "task_id") -> str:
    """A task id: an identifier that a URL path can name (`/api/tasks/{task_id}`): `.`
    and `..` cannot be, browsers and HTTP clients resolve them as dot-segments."""
    task_id = validate_identifier(name, value)
    if task_id in (".", ".."):
        raise EventError(f"{name} cannot be {task_id!r}: no URL can name it")
    return task_id


def _optional_text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventError(f"{name} must be a string")
    if len(value) > MAX_TEXT_LENGTH:
        raise EventError(f"{name} must be at most {MAX_TEXT_LENGTH} characters long")
    _require_unicode(name, value)
    return value


def _optional_count(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise EventError(f"{name} must be an integer from 0 to {MAX_COUNT}")
    return value


def _progress(value: object) -> float | int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError("progress must be a number from 0 to 100")
    if not 0 <= value <= 100 or not math.isfinite(value):  # huge ints: no float
        raise EventError("progress must be a number from 0 to 100")
    return value


_ISO_8601 = re.compile(
    r"\d{4}-\d{2}-\d{2}"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,
)


def _iso_timestamp(name: str, value: object) -> str | None:
    if value is None:
        return None
    # fromisoformat alone is lenient (any separator character, trailing NUL): the
    # shape is checked first, the calendar values then.
    if not isinstance(value, str) or not _ISO_8601.fullmatch(value):
        raise EventError(f"{name} must be an ISO 8601 timestamp such as 2030-01-31T12:00:00Z")
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise EventError(f"{name} must be an ISO 8601 timestamp, got {value!r}") from None
    return value


def json_depth_exceeds(value: object, limit: int) -> bool:
    """True when containers nest deeper than `limit` (iterative: no recursion limit)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _result_data(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EventError("result_data must be a JSON object")
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise EventError(f"result_data must not nest deeper than {MAX_JSON_DEPTH} levels")
    try:
        encoded = dumps(value)
        size = len(encoded.encode("utf-8"))
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise EventError(f"result_data is not JSON-serialisable as UTF-8: {exc}") from None
    if size > MAX_RESULT_BYTES:
        raise EventError(f"result_data must be at most {MAX_RESULT_BYTES} bytes as JSON")
    # Read-only all the way down: what was measured is what is published.
    frozen: dict[str, Any] = _frozen_lists(json.loads(encoded, object_hook=BuiltFields))
    return frozen


def _frozen_lists(value: Any) -> Any:
    """`value` (JSON as loaded) with each list replaced by a read-only one."""
    if isinstance(value, dict):
        for key, item in dict.items(value):
            if isinstance(item, list | dict):
                dict.__setitem__(value, key, _frozen_lists(item))
        return value
    if isinstance(value, list):
        return BuiltList(_frozen_lists(item) for item in value)
    return value


class BuiltFields(dict[str, Any]):
    """The fields of an event a builder made: read-only, so that what was validated is
    what is published (an event is not reused by changing its fields: build another)."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError(
            "an event's fields cannot be changed once it is built: build another "
            "(progress_event, completed_event)"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse
    __ior__ = _refuse

    def __reduce__(self) -> tuple[type[BuiltFields], tuple[dict[str, Any]]]:
        return BuiltFields, (dict(self),)  # made again whole, not item by item


class BuiltList(list[Any]):
    """A list in an event's `result_data`: read-only, as its fields are."""

    __slots__ = ()

    _refuse = BuiltFields._refuse
    __setitem__ = __delitem__ = append = extend = insert = pop = remove = clear = _refuse
    sort = reverse = __iadd__ = __imul__ = _refuse

    def __reduce__(self) -> tuple[type[BuiltList], tuple[list[Any]]]:
        return BuiltList, (list(self),)


@dataclass(frozen=True)
class TaskEvent:
    """One validated progress or completion event, before it gets its id."""

    user_id: str
    task_id: str
    type: EventType
    fields: Mapping[str, Any]
    published_at: str = field(default_factory=utc_now_iso)
    # Set by the builders, which validate: an event made any other way (by hand, or
    # with dataclasses.replace, which does not copy it) is validated before it is
    # published (`validated`).
    _built: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def status(self) -> str:
        status: str = self.fields["status"]
        return status

    @property
    def terminal(self) -> bool:
        return self.type == "task_completed"

    def to_json(self, state: TaskState) -> str:
        """The wire message without its id (the broker assigns the id): the event's type
        and the task's full state after it (`state`, as `full_task_state` gives it), so
        that a client that replaces its copy of the task with the event is always right,
        even when the producer published one field."""
        return event_json(self.type, self.task_id, state)

    def state_update(self) -> StateUpdate:
        """How this event changes the stored task state: its task id and its fields that
        are not None, then its stamps (`state_stamps`)."""
        values: dict[str, Any] = {"task_id": self.task_id}
        values.update({k: v for k, v in self.fields.items() if v is not None})
        stamps, if_absent = self.state_stamps()
        values.update(stamps)
        return StateUpdate(values=values, if_absent=if_absent, terminal=self.terminal)

    def state_stamps(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """What the event stores beyond its own fields: values set (after the fields, so
        they win), and values set only where the state has none yet."""
        now = self.published_at
        if_absent = {"created_at": now}
        if self.terminal or self.status in RUNNING_STATUSES:
            if_absent["started_at"] = now
        if not self.terminal:
            return {}, if_absent
        if self.status == "SUCCESS":
            return {"completed_at": now, "progress": 100}, if_absent
        return {"completed_at": now}, if_absent


@dataclass(frozen=True)
class StateUpdate:
    values: Mapping[str, Any]
    if_absent: Mapping[str, Any]
    terminal: bool

    def apply(self, state: TaskState) -> TaskState:
        merged = dict(state)
        merged.update(self.values)
        for key, value in self.if_absent.items():
            merged.setdefault(key, value)
        return merged


# The state fields an event carries after its type and task id, in this order (the
# Redis publish script builds the same text).
EVENT_STATE_FIELDS = TASK_STATE_FIELDS[1:]


def event_json(event_type: str, task_id: str, state: Mapping[str, Any]) -> str:
    body = {"type": event_type, "task_id": task_id}
    body.update((name, state[name]) for name in EVENT_STATE_FIELDS)
    return dumps(body)


def full_task_state(stored: Mapping[str, Any]) -> TaskState:
    """A task state with every field of the wire format present (None when unknown)."""
    state = {name: stored.get(name) for name in TASK_STATE_FIELDS}
    if state["result_data"] is None:
        state["result_data"] = {}
    return state


def progress_event(
    user_id: object,
    task_id: object,
    *,
    progress: object = None,
    current_step: object = None,
    processed_items: object = None,
    total_items: object = None,
    status: object = "PROGRESS",
    task_name: object = None,
    category: object = None,
    estimated_completion: object = None,
) -> TaskEvent:
    if not isinstance(status, str) or status not in PROGRESS_STATUSES:
        raise _status_error("task_progress", PROGRESS_STATUSES, status)
    fields: dict[str, Any] = {
        "status": status,
        "progress": _progress(progress),
        "current_step": _optional_text("current_step", current_step),
        "processed_items": _optional_count("processed_items", processed_items),
        "total_items": _optional_count("total_items", total_items),
    }
    optional = {
        "task_name": _optional_text("task_name", task_name),
        "category": _optional_text("category", category),
        "estimated_completion": _iso_timestamp("estimated_completion", estimated_completion),
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return _new_event(user_id, task_id, "task_progress", fields)


def _new_event(
    user_id: object, task_id: object, kind: EventType, fields: dict[str, Any]
) -> TaskEvent:
    return _built(
        TaskEvent(
            user_id=validate_identifier("user_id", user_id),
            task_id=validate_task_id(task_id),
            type=kind,
            fields=BuiltFields(fields),
        )
    )


def _built(event: TaskEvent) -> TaskEvent:
    object.__setattr__(event, "_built", True)
    return event


def _status_error(kind: str, allowed: Collection[str], status: object) -> EventError:
    """Named as a JSON body has it (null, not None), with a hint for a status in the
    wrong case or of the other kind of event."""
    try:
        shown = json.dumps(status, ensure_ascii=False)
    except (TypeError, ValueError):
        shown = repr(status)
    message = f"status of a {kind} event must be one of {sorted(allowed)}, got {shown}"
    if isinstance(status, str):
        known = status.upper() in PROGRESS_STATUSES | TERMINAL_STATUSES
        if known and status != status.upper():
            message += f" (statuses are upper case: {status.upper()})"
        elif status in TERMINAL_STATUSES:
            message += " (a terminal status ends a task: a task_completed event)"
        elif status in PROGRESS_STATUSES:
            message += " (a running task's status: a task_progress event)"
    return EventError(message)


def completed_event(
    user_id: object,
    task_id: object,
    *,
    status: object = "SUCCESS",
    result_data: object = None,
    error_message: object = None,
) -> TaskEvent:
    if not isinstance(status, str) or status not in TERMINAL_STATUSES:
        raise _status_error("task_completed", TERMINAL_STATUSES, status)
    fields = {
        "status": status,
        "result_data": _result_data(result_data),
        "error_message": _optional_text("error_message", error_message),
    }
    return _new_event(user_id, task_id, "task_completed", fields)


_PROGRESS_KEYS = frozenset(
    {
        "progress",
        "current_step",
        "processed_items",
        "total_items",
        "status",
        "task_name",
        "category",
        "estimated_completion",
    }
)
_COMPLETED_KEYS = frozenset({"status", "result_data", "error_message"})


def event_from_payload(payload: object) -> TaskEvent:
    """Validate a producer's JSON object (HTTP body): `user_id`, `task_id`, event fields.

    `type` may be left out: a terminal status means task_completed.
    Unknown fields are refused so that typos do not silently lose data.
    """
    if not isinstance(payload, dict):
        raise EventError("the body must be a JSON object")
    body = dict(payload)
    user_id = body.pop("user_id", None)
    task_id = body.pop("task_id", None)
    if user_id is None:
        raise EventError("user_id is required")
    if task_id is None:
        raise EventError("task_id is required")
    event_type = body.pop("type", None)
    if event_type is None:
        status = body.get("status")
        terminal = isinstance(status, str) and status in TERMINAL_STATUSES
        event_type = "task_completed" if terminal else "task_progress"
    if event_type == "task_progress":
        allowed = _PROGRESS_KEYS
    elif event_type == "task_completed":
        allowed = _COMPLETED_KEYS
    else:
        raise EventError("type must be task_progress or task_completed")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise EventError(f"unknown field(s) for {event_type}: {', '.join(unknown)}")
    if event_type == "task_progress":
        body.setdefault("status", "PROGRESS")
        return progress_event(user_id, task_id, **body)
    body.setdefault("status", "SUCCESS")
    return completed_event(user_id, task_id, **body)


def validated(event: TaskEvent) -> TaskEvent:
    """`event` when `progress_event` or `completed_event` made it; else the same event
    as they make it (the checks and the defaults of their arguments), or EventError
    for what they refuse."""
    if event._built:
        return event
    fields = event.fields
    if not isinstance(fields, Mapping) or not all(isinstance(name, str) for name in fields):
        raise EventError("fields must be a mapping of field names to values")
    if event.type == "task_progress":
        allowed, build = _PROGRESS_KEYS, progress_event
    elif event.type == "task_completed":
        allowed, build = _COMPLETED_KEYS, completed_event  # type: ignore[assignment]
    else:
        raise EventError("type must be task_progress or task_completed")
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise EventError(f"unknown field(s) for {event.type}: {', '.join(unknown)}")
    made = build(event.user_id, event.task_id, **fields)
    published_at = _iso_timestamp("published_at", event.published_at)
    if published_at is None:
        raise EventError("published_at must be an ISO 8601 timestamp")
    return _built(TaskEvent(made.user_id, made.task_id, made.type, made.fields, published_at))
