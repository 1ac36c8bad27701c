"""The embedded broker: everything in this process's memory, same semantics as Redis."""

from __future__ import annotations

import bisect
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..events import TaskEvent, TaskState, dumps, full_task_state, validated
from ..wire import Delivery, EventId, with_id
from .base import (
    ACTIVE_TASK_TTL_S,
    MAX_SNAPSHOT_BYTES,
    MAX_SNAPSHOT_TASKS,
    Broker,
    Listener,
    Replay,
    Snapshot,
)


@dataclass
class _History:
    """A user's retained events; `position` is the last id it gave out (an event's,
    or that of an empty history started for a snapshot)."""

    entries: deque[tuple[EventId, Delivery]]
    position: EventId
    last_write: float = 0.0
    max_deleted: EventId | None = None


@dataclass
class _UserTasks:
    states: dict[str, TaskState] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)  # task_id -> created
    finished: dict[str, float] = field(default_factory=dict)  # task_id -> monotonic time
    last_event: dict[str, float] = field(default_factory=dict)  # task_id -> monotonic time


SWEEP_INTERVAL_S = 10.0


class MemoryBroker(Broker):
    def __init__(
        self,
        *,
        history_size: int,
        history_ttl: int,
        clock: Callable[[], float] = time.monotonic,  # for what expires
    ) -> None:
        self._clock = clock
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._epoch = secrets.token_hex(4)
        self._last_id = EventId(self._epoch, 0, 0)
        self._histories: dict[str, _History] = {}
        self._users: dict[str, _UserTasks] = {}
        self._cancelled: set[tuple[str, str]] = set()  # (user, task)
        self._listener: Listener | None = None
        self._last_sweep = self._clock()

    async def start(self, listener: Listener) -> None:
        self._listener = listener

    async def close(self) -> None:
        self._listener = None

    def _next_id(self) -> EventId:
        now_ms = int(time.time() * 1000)
        if now_ms > self._last_id.ms:
            self._last_id = EventId(self._epoch, now_ms, 0)
        else:
            self._last_id = EventId(self._epoch, self._last_id.ms, self._last_id.seq + 1)
        return self._last_id

    def _history(self, user_id: str) -> _History | None:
        history = self._histories.get(user_id)
        if history is not None and self._clock() - history.last_write > self._history_ttl:
            del self._histories[user_id]
            return None
        return history

    def _sweep(self) -> None:
        """Forget what Redis would have expired by now (idle histories, old finished
        tasks), every SWEEP_INTERVAL_S; what is read is checked when it is read."""
        now = self._clock()
        if now - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for user_id in list(self._histories):
            self._history(user_id)
        for user_id, tasks in list(self._users.items()):
            for task_id in list(tasks.states):
                self._expired(user_id, tasks, task_id)

    def _expired(self, user_id: str, tasks: _UserTasks, task_id: str) -> bool:
        """Whether the task's state is gone, as Redis expires it: a finished task after
        the history's TTL, and (its producer died) an unfinished one quiet for a week,
        with its cancel request. Forgets it then."""
        if task_id not in tasks.states:
            return True
        now = self._clock()
        finished = tasks.finished.get(task_id)
        if finished is not None:
            expired = now - finished > self._history_ttl
        else:
            active_ttl = max(ACTIVE_TASK_TTL_S, self._history_ttl)
            expired = now - tasks.last_event.get(task_id, now) > active_ttl
        if expired:
            for kept in (tasks.states, tasks.finished, tasks.active, tasks.last_event):
                kept.pop(task_id, None)
            self._cancelled.discard((user_id, task_id))
            if not tasks.states:
                self._users.pop(user_id, None)
        return expired

    def _tasks(self, user_id: str, task_id: str) -> _UserTasks | None:
        """The user's tasks, `task_id`'s state checked for expiry."""
        self._sweep()
        tasks = self._users.get(user_id)
        if tasks is not None:
            self._expired(user_id, tasks, task_id)
        return self._users.get(user_id)

    async def publish(self, event: TaskEvent) -> EventId:
        event = validated(event)  # one made by hand
        self._tasks(event.user_id, event.task_id)
        tasks = self._users.setdefault(event.user_id, _UserTasks())
        update = event.state_update()
        flag = (event.user_id, event.task_id)
        was_active = event.task_id in tasks.active
        previous = tasks.states.get(event.task_id, {})
        if not was_active and previous.get("completed_at") is not None:
            previous = {}  # a new run of a finished task id starts from a clean state
        tasks.states[event.task_id] = update.apply(previous)
        tasks.last_event[event.task_id] = self._clock()
        if update.terminal:
            tasks.active.pop(event.task_id, None)
            tasks.finished[event.task_id] = self._clock()
            self._cancelled.discard(flag)
        else:
            tasks.finished.pop(event.task_id, None)
            if not was_active:
                # A new run of this task id: a cancellation of an earlier run does not apply.
                self._cancelled.discard(flag)
                tasks.active[event.task_id] = time.time()

        event_id = self._next_id()
        delivery = Delivery(
            user_id=event.user_id,
            task_id=event.task_id,
            event_id=event_id,
            type=event.type,
            json=with_id(event.to_json(full_task_state(tasks.states[event.task_id])), event_id),
        )
        history = self._history(event.user_id)
        if history is None:
            # A history that expired and starts again: earlier resume points are gaps.
            history = self._new_history(event.user_id, event_id)
        if len(history.entries) >= self._history_size:
            history.max_deleted = history.entries.popleft()[0]
        history.entries.append((event_id, delivery))
        history.position = event_id
        history.last_write = self._clock()

        if self._listener is not None:
            self._listener.deliver(delivery)
        return event_id

    def _new_history(self, user_id: str, start: EventId) -> _History:
        """An empty history whose earlier positions (before `start`) are gaps."""
        history = _History(deque(), position=start, last_write=self._clock(), max_deleted=start)
        self._histories[user_id] = history
        return history

    async def snapshot(
        self, user_id: str, task_id: str | None = None, *, at_least: EventId | None = None
    ) -> Snapshot:
        # `at_least` does not apply: this broker never comes back with older data.
        history = self._history(user_id)
        if history is None:
            history = self._new_history(user_id, self._next_id())
        self._sweep()
        tasks = self._users.get(user_id)
        if tasks is None:
            return Snapshot([], history.position)
        newest_first = sorted(tasks.active.items(), key=lambda item: item[1], reverse=True)
        ids = [
            task
            for task, _ in newest_first
            if (task_id is None or task == task_id) and not self._expired(user_id, tasks, task)
        ]
        states = [full_task_state(tasks.states[task]) for task in ids[:MAX_SNAPSHOT_TASKS]]
        truncated = len(ids) > MAX_SNAPSHOT_TASKS
        size = 0
        for count, state in enumerate(states):
            size += len(dumps(state))
            if size > MAX_SNAPSHOT_BYTES:
                states, truncated = states[:count], True
                break
        return Snapshot(states, history.position, truncated=truncated)

    async def task_state(self, user_id: str, task_id: str) -> TaskState | None:
        tasks = self._tasks(user_id, task_id)
        if tasks is None or task_id not in tasks.states:
            return None
        return full_task_state(tasks.states[task_id])

    async def request_cancel(self, user_id: str, task_id: str) -> bool:
        tasks = self._tasks(user_id, task_id)
        if tasks is None or task_id not in tasks.active:
            return False
        self._cancelled.add((user_id, task_id))
        return True

    async def is_cancelled(self, user_id: str, task_id: str) -> bool:
        self._tasks(user_id, task_id)
        return (user_id, task_id) in self._cancelled

    async def replay(self, user_id: str, after: str, limit: int | None = None) -> Replay:
        resume_point = EventId.parse(after)
        history = self._history(user_id)
        if resume_point is None or resume_point.epoch != self._epoch or history is None:
            return Replay([], complete=False)
        if resume_point > history.position:
            return Replay([], complete=False)
        if history.max_deleted is not None and history.max_deleted > resume_point:
            return Replay([], complete=False)
        entries = history.entries
        # Ids increase along the history: where a page starts is found by bisection, not
        # by comparing every retained event (up to a million per user) for each page.
        start = bisect.bisect_right(entries, resume_point.key, key=lambda entry: entry[0].key)
        given = start > 0 and entries[start - 1][0].key == resume_point.key
        if not given and history.max_deleted != resume_point:
            # No id this user was given (another user's, or made up), as Redis answers.
            return Replay([], complete=False)
        stop = None if limit is None else start + limit
        page = itertools.islice(entries, start, stop)
        return Replay([delivery for _, delivery in page], complete=True)

    async def ready(self) -> bool:
        return True
