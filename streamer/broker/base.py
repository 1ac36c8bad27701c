"""What the rest of the service needs from a broker: two small interfaces.

`Broker` carries events: publish, route a user's events to this process (subscribe /
unsubscribe), snapshot and replay. `TaskStore` answers the commands: a task's state and
cancellation. Two implementations hold both: `MemoryBroker` (embedded, one process) and
`RedisBroker`. Each process holds exactly one subscription and hands every event,
encoded once, to one listener (the hub).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..events import TaskEvent, TaskState
from ..wire import Delivery, EventId

# A snapshot is bounded in tasks and in bytes (the states' stored size), so that no
# reply, and no Redis script run, grows with what producers chose to store.
# Unfinished tasks are kept this long after their last event (at least as long as
# the history), so a producer that died does not leave a task in everyone's snapshot
# forever.
ACTIVE_TASK_TTL_S = 7 * 86400
MAX_SNAPSHOT_TASKS = 500
MAX_SNAPSHOT_BYTES = 256 * 1024


class Listener(Protocol):
    """Who the broker hands events to: the process's hub."""

    def deliver(self, delivery: Delivery) -> None: ...

    def deliver_all(self, deliveries: Sequence[Delivery]) -> None:
        """Events that arrived together, in order: handed on at once."""

    def reset(self, user_id: str | None = None) -> None:
        """The broker lost its data (only `user_id`'s, if given): those clients must
        resynchronise from a snapshot."""

    def resume_points(self) -> dict[str, EventId | None]:
        """For each user with connections here, where to catch up from after a lost
        subscription: the oldest event id one of them has (None: all of the history)."""


class BrokerUnavailable(Exception):
    """The broker cannot be reached; nothing was published or read."""


@dataclass(frozen=True)
class Snapshot:
    """The user's unfinished tasks (newest first) and their position in their history,
    read together: every event up to `position` is reflected in `tasks`, and resuming
    from `position` replays exactly what came after. `truncated`: more tasks exist
    than a snapshot may carry."""

    tasks: list[TaskState]
    position: EventId
    truncated: bool = False


@dataclass(frozen=True)
class Replay:
    """Events after a resume point; `complete` is False when some may be missing.

    `read` history entries were read, the last of them `last_read`: more than the
    events when some could not be decoded (skipped, never retried). A page of a replay
    is full, and the next one starts, by what was read.
    """

    events: list[Delivery]
    complete: bool
    read: int = -1  # -1: as many as the events
    last_read: EventId | None = None  # None: the last event's

    def __post_init__(self) -> None:
        if self.read < 0:
            object.__setattr__(self, "read", len(self.events))
        if self.last_read is None and self.events:
            object.__setattr__(self, "last_read", self.events[-1].event_id)


class TaskStore(ABC):
    @abstractmethod
    async def task_state(self, user_id: str, task_id: str) -> TaskState | None:
        """The task's state, or None when it is unknown or belongs to someone else."""

    @abstractmethod
    async def request_cancel(self, user_id: str, task_id: str) -> bool:
        """Record a cancellation request; False for unknown, foreign or finished tasks."""

    @abstractmethod
    async def is_cancelled(self, user_id: str, task_id: str) -> bool:
        """Whether the user asked to cancel their task's current run."""


class Broker(TaskStore):
    @abstractmethod
    async def start(self, listener: Listener) -> None:
        """Open the process's one subscription; each event goes to the listener."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def publish(self, event: TaskEvent) -> EventId:
        """Store the task's new state and append the event, atomically; return its id."""

    async def publish_many(self, events: Iterable[TaskEvent]) -> list[EventId]:
        """Publish events in order, each as `publish` does; return their ids."""
        return [await self.publish(event) for event in events]

    async def subscribe(self, user_id: str) -> None:
        """Route the user's events to this process; returns once they flow. Called for
        a user's first connection here (the hub counts them)."""

    def unsubscribe(self, user_id: str) -> None:
        """This process no longer needs the user's events (their last connection left)."""

    @abstractmethod
    async def snapshot(
        self, user_id: str, task_id: str | None = None, *, at_least: EventId | None = None
    ) -> Snapshot:
        """The user's unfinished tasks (only `task_id` if given) and position, atomically.

        A user without history gets a position all the same: a new, empty history. With
        `at_least` (what a live client was sent before the broker lost its data), a
        position below it in the same epoch moves up to it: the data came back older.
        """

    @abstractmethod
    async def replay(self, user_id: str, after: str, limit: int | None = None) -> Replay:
        """The user's events published after the id `after`, oldest first: the first
        `limit` of them (all for None); the rest is read by asking again after the last."""

    @abstractmethod
    async def ready(self) -> bool:
        """True when the broker can publish and deliver."""

    @property
    def reconnects(self) -> int:
        """How many times this process's subscription was lost and opened again."""
        return 0
