"""What clients must receive, computed from the events published: a model of the task
states, independent of both brokers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from streamer.events import TaskEvent, TaskState, full_task_state
from streamer.wire import EventId


def expected_messages(events: Iterable[tuple[TaskEvent, EventId]]) -> list[dict[str, Any]]:
    """Each event as a client must get it, for events of tasks without a state before
    them, published in this order: its id, type and task id, then the task's full state
    after it, merged from the events before it (a new run of a finished task starting
    clean)."""
    states: dict[tuple[str, str], TaskState] = {}
    expected = []
    for event, event_id in events:
        key = (event.user_id, event.task_id)
        previous = states.get(key, {})
        if previous.get("completed_at") is not None:
            previous = {}  # a new run
        states[key] = event.state_update().apply(previous)
        state = full_task_state(states[key])
        expected.append({"id": str(event_id), **json.loads(event.to_json(state))})
    return expected
