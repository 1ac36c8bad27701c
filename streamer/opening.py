"""What a client gets first: the snapshot, then the events it missed since its resume
point, read from the history and written a page at a time.

A resume from far back reads up to the whole retained history; read and written at
once, it would sit in the worker's memory several times over (Redis's reply, the
events, their frames, the socket's buffer) for every client resuming at that moment.
Page by page, each page once the client has taken the one before, a resume costs at
most a page in the worker whatever the history's size. Live events wait in the
connection's bounded outbox meanwhile, as they do while the snapshot is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .broker.base import Broker, BrokerUnavailable
from .connection import Connection
from .reasons import Reason
from .wire import Delivery, EventId, active_tasks

REPLAY_PAGE = 100  # events read and written at once


@dataclass
class Opening:
    """The frames to write first; `continue_after`: the id after which the replay goes
    on (None: it is all here); `replayed`: how many of the frames are replayed events."""

    frames: list[bytes]
    replayed: int = 0
    continue_after: EventId | None = None


async def read_opening(
    broker: Broker,
    connection: Connection,
    *,
    last_event_id: str | None,
    encode_snapshot: Callable[[str, EventId], bytes],
) -> Opening:
    """The snapshot, then the first page of the replay after `last_event_id`. Events
    that arrive meanwhile wait in the connection, those covered are dropped."""
    user_id, task_id = connection.user_id, connection.task_id
    # Snapshot first: the replay, read after it, then holds every missed event up to
    # now, and what waits in the connection only what came after the replay.
    snapshot = await broker.snapshot(user_id, task_id)
    connection.skip_through(snapshot.position)
    position, recovered = snapshot.position, True
    page = _Page([], None)
    if last_event_id is not None:
        replay = await broker.replay(user_id, last_event_id, REPLAY_PAGE)
        resume_point = EventId.parse(last_event_id)
        recovered = replay.complete
        if replay.complete and resume_point is not None:
            # The replayed events follow the snapshot: it stands at the resume point,
            # so that ids on the connection only go up and a client that drops right
            # after the snapshot still gets them next time.
            position = resume_point
            page = _page(connection, replay.events)
    message = active_tasks(
        snapshot.tasks, position=position, recovered=recovered, truncated=snapshot.truncated
    )
    return Opening(
        [encode_snapshot(message, position), *page.frames], len(page.frames), page.continue_after
    )


async def send_opening(broker: Broker, connection: Connection, opening: Opening) -> int:
    """Write the opening, reading the rest of the replay a page at a time, each once
    the client has taken the last; then the connection goes live. Returns how many
    replayed events were sent."""
    frames, count, cursor = opening.frames, opening.replayed, opening.continue_after
    opening.frames = []  # not kept past their write
    replayed = 0
    while cursor is not None and not connection.stale:
        if connection.close_reason is not None:
            return replayed
        replayed += count
        if not await connection.send_opening_part(frames):
            return replayed
        try:
            replay = await broker.replay(connection.user_id, str(cursor), REPLAY_PAGE)
        except BrokerUnavailable:
            connection.close(Reason.BROKER_UNAVAILABLE)
            return replayed
        if connection.stale:
            frames = []  # of the lost data: `go_live` resyncs instead
            break
        if not replay.complete:
            # The history moved on past what the client has read of it: it resumes
            # from there and is told what it missed (`recovered: false`).
            connection.close(Reason.OVERFLOW)
            return replayed
        page = _page(connection, replay.events)
        frames, count, cursor = page.frames, len(page.frames), page.continue_after
    if connection.go_live(frames):
        replayed += count
    return replayed


@dataclass
class _Page:
    frames: list[bytes]
    continue_after: EventId | None


def _page(connection: Connection, events: list[Delivery]) -> _Page:
    """A page of the replay as frames for the connection (its task's events only, under
    a task filter); live events it covers are dropped from what waits."""
    if not events:
        return _Page([], None)
    last = events[-1].event_id
    connection.skip_through(last)
    task_id = connection.task_id
    frames = [d.frame(connection.transport) for d in events if task_id in (None, d.task_id)]
    return _Page(frames, last if len(events) == REPLAY_PAGE else None)
