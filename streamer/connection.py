"""What both transports do for one client: subscribe, snapshot, replay, then live events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from .broker import Broker, Snapshot
from .events import Delivery, EventId, TaskState, dumps
from .hub import CloseReason, Hub, Resync, Subscription


def active_tasks_message(tasks: list[TaskState], *, recovered: bool) -> str:
    return dumps({"type": "active_tasks", "tasks": tasks, "recovered": recovered})


async def current_tasks(broker: Broker, subscription: Subscription) -> Snapshot:
    """The subscriber's unfinished tasks; queued events they already reflect are dropped,
    so a client never gets an event older than its snapshot from the live stream."""
    snapshot = await broker.snapshot(subscription.user_id)
    if snapshot.last_event_id is not None:
        subscription.skip_through(snapshot.last_event_id)
    tasks = snapshot.tasks
    if subscription.task_id is not None:
        tasks = [task for task in tasks if task["task_id"] == subscription.task_id]
    return Snapshot(tasks, snapshot.last_event_id)


def _optional_id(event_id: EventId | None) -> str | None:
    return None if event_id is None else str(event_id)


@dataclass(frozen=True)
class Outgoing:
    """One message for a transport to send; `event_id` is None for a snapshot of a
    user without history."""

    json: str
    type: str
    event_id: str | None


async def outgoing_messages(broker: Broker, stream: ClientStream) -> AsyncIterator[Outgoing]:
    """Everything a client is sent, in order: snapshot, replay, then live events
    (and a fresh snapshot wherever the broker lost its data)."""
    # A snapshot's id is the newest event it reflects: resuming from there is exact.
    yield Outgoing(stream.snapshot, "active_tasks", stream.snapshot_id)
    for delivery in stream.replayed:
        yield Outgoing(delivery.json, delivery.type, str(delivery.event_id))
    subscription = stream.subscription
    while (item := await subscription.next()) is not None:
        if isinstance(item, Resync):
            snapshot = await current_tasks(broker, subscription)
            message = active_tasks_message(snapshot.tasks, recovered=False)
            yield Outgoing(message, "active_tasks", _optional_id(snapshot.last_event_id))
        else:
            yield Outgoing(item.json, item.type, str(item.event_id))


@dataclass
class ClientStream:
    """A subscribed client: send `snapshot`, then `replayed`, then `subscription.next()`
    until it returns None."""

    subscription: Subscription
    snapshot: str
    replayed: list[Delivery] = field(default_factory=list)
    snapshot_id: str | None = None


@asynccontextmanager
async def open_client_stream(
    hub: Hub,
    broker: Broker,
    *,
    user_id: str,
    task_id: str | None,
    last_event_id: str | None,
    expires_at: float | None,
) -> AsyncIterator[ClientStream]:
    """Subscribe before reading the snapshot and history, so nothing falls in between;
    events queued meanwhile that the snapshot or the replay already cover are dropped."""
    subscription = hub.subscribe(user_id, task_id)
    expiry: asyncio.TimerHandle | None = None
    try:
        if expires_at is not None:
            delay = max(expires_at - time.time(), 0)
            expiry = asyncio.get_running_loop().call_later(
                delay, subscription.close, CloseReason.EXPIRED
            )
        # Snapshot first: the replay, read after it, then holds every missed event up
        # to now, and the live queue only what comes after the replay.
        current = await current_tasks(broker, subscription)
        recovered = True
        replayed: list[Delivery] = []
        if last_event_id is not None:
            replay = await broker.replay(user_id, last_event_id)
            recovered = replay.complete
            replayed = [d for d in replay.events if subscription.wants(d)]
            if replay.events:
                subscription.skip_through(replay.events[-1].event_id)
        snapshot = active_tasks_message(current.tasks, recovered=recovered)
        yield ClientStream(
            subscription, snapshot, replayed, snapshot_id=_optional_id(current.last_event_id)
        )
    finally:
        if expiry is not None:
            expiry.cancel()
        hub.unsubscribe(subscription)


async def run_until_first_done(*coroutines: Coroutine[Any, Any, object]) -> None:
    """Run side by side; when one finishes, cancel the others and wait for them."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            # A peer that went away shows up as one of these; anything else is a bug.
            with contextlib.suppress(
                asyncio.CancelledError, ConnectionError, RuntimeError, TimeoutError
            ):
                await task
