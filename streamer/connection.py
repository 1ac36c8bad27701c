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
from .events import Delivery, EventId, dumps
from .hub import CloseReason, Hub, Resync, Subscription


def active_tasks_message(snapshot: Snapshot, *, recovered: bool, position: EventId) -> str:
    """`active_tasks`, whose `id` is where the client stands once it has it: resuming
    from there misses nothing and repeats nothing."""
    return dumps(
        {
            "type": "active_tasks",
            "id": str(position),
            "tasks": snapshot.tasks,
            "recovered": recovered,
            "truncated": snapshot.truncated,
        }
    )


async def current_tasks(broker: Broker, subscription: Subscription) -> Snapshot:
    """The subscriber's unfinished tasks; queued events they already reflect are dropped,
    so a client never gets an event older than its snapshot from the live stream."""
    snapshot = await broker.snapshot(subscription.user_id, subscription.task_id)
    subscription.skip_through(snapshot.position)
    return snapshot


@dataclass(frozen=True)
class Outgoing:
    """One message for a transport to send, with the id it carries."""

    json: str
    type: str
    event_id: EventId


async def outgoing_messages(broker: Broker, stream: ClientStream) -> AsyncIterator[Outgoing]:
    """Everything a client is sent, in order: snapshot, replay, then live events
    (and a fresh snapshot wherever the broker lost its data)."""
    yield Outgoing(stream.snapshot, "active_tasks", stream.snapshot_id)
    for delivery in stream.replayed:
        yield Outgoing(delivery.json, delivery.type, delivery.event_id)
    subscription = stream.subscription
    while (item := await subscription.next()) is not None:
        if isinstance(item, Resync):
            snapshot = await current_tasks(broker, subscription)
            message = active_tasks_message(snapshot, recovered=False, position=snapshot.position)
            yield Outgoing(message, "active_tasks", snapshot.position)
        else:
            yield Outgoing(item.json, item.type, item.event_id)


@dataclass
class ClientStream:
    """A subscribed client: send `snapshot`, then `replayed`, then `subscription.next()`
    until it returns None."""

    subscription: Subscription
    snapshot: str
    snapshot_id: EventId
    replayed: list[Delivery] = field(default_factory=list)


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
        position, recovered = current.position, True
        replayed: list[Delivery] = []
        resume_point = EventId.parse(last_event_id) if last_event_id is not None else None
        if last_event_id is not None:
            replay = await broker.replay(user_id, last_event_id)
            recovered = replay.complete
            if replay.complete and resume_point is not None:
                # The replayed events follow the snapshot: it stands at the resume
                # point, so that ids on the connection only go up and a client that
                # drops right after the snapshot still gets them next time.
                position = resume_point
                replayed = [d for d in replay.events if subscription.wants(d)]
                if replay.events:
                    subscription.skip_through(replay.events[-1].event_id)
        snapshot = active_tasks_message(current, recovered=recovered, position=position)
        yield ClientStream(subscription, snapshot, position, replayed)
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
