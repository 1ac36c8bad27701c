"""What a client gets first: the snapshot, then the events it missed since its resume
point, read from the history and written a page at a time.

A resume from far back reads up to the whole retained history; read and written at
once, it would sit in the worker's memory several times over (Redis's reply, the
events, their frames, the socket's buffer) for every client resuming at that moment.
Page by page, each page once the client has taken the one before, a resume costs at
most a page in the worker whatever the history's size. Live events wait in the
connection's bounded outbox meanwhile; when more come than it holds, they are dropped
from it (they are in the history too) and read with the next pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .broker.base import Broker, Replay
from .connection import Connection
from .reasons import Reason
from .wire import EventId, active_tasks

REPLAY_PAGE = 100  # events read and written at once


@dataclass
class Opening:
    """The frames to write first; `replayed`: how many of them are replayed events;
    `position`: where the client stands once it has them (their last event's id, or
    the snapshot's); `more`: the replay goes on after it."""

    frames: list[bytes]
    position: EventId
    replayed: int = 0
    more: bool = False


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
    page = _Page([], None, full=False)
    if last_event_id is not None:
        replay = await broker.replay(user_id, last_event_id, REPLAY_PAGE)
        resume_point = EventId.parse(last_event_id)
        recovered = replay.complete
        if replay.complete and resume_point is not None:
            # The replayed events follow the snapshot: it stands at the resume point,
            # so that ids on the connection only go up and a client that drops right
            # after the snapshot still gets them next time.
            position = resume_point
            page = _page(connection, replay)
    message = active_tasks(
        snapshot.tasks, position=position, recovered=recovered, truncated=snapshot.truncated
    )
    return Opening(
        [encode_snapshot(message, position), *page.frames],
        position=page.last or position,
        replayed=len(page.frames),
        more=page.full,
    )


async def send_opening(broker: Broker, connection: Connection, opening: Opening) -> int:
    """Write the opening, reading the rest of the replay a page at a time, each once
    the client has taken the last, and what was dropped from the connection's outbox
    meanwhile; then the connection goes live. Returns how many replayed events were
    sent."""
    frames, count, position, more = opening.frames, opening.replayed, opening.position, opening.more
    opening.frames = []  # not kept past their write
    replayed = accounted = 0
    while not connection.stale and (more or connection.dropped != accounted):
        if connection.close_reason is not None:
            return replayed
        replayed += count
        if not await connection.send_opening_part(frames):
            return replayed
        # Events dropped from the outbox from here on may be newer than this read.
        accounted = connection.dropped
        replay = await _read_page(broker, connection, position)
        if replay is None:
            return replayed
        if connection.stale:
            frames = []  # of the lost data: `go_live` resyncs instead
            break
        if not replay.complete:
            # The history moved on past what the client has read of it: it resumes
            # from there and is told what it missed (`recovered: false`).
            connection.close(Reason.OVERFLOW)
            return replayed
        page = _page(connection, replay)
        frames, count, more = page.frames, len(page.frames), page.full
        position = page.last or position
    if connection.go_live(frames):
        replayed += count
    return replayed


async def _read_page(broker: Broker, connection: Connection, after: EventId) -> Replay | None:
    """The next page; None when the stream ended."""
    return await connection.read_from_broker(
        lambda: broker.replay(connection.user_id, str(after), REPLAY_PAGE)
    )


@dataclass
class _Page:
    frames: list[bytes]
    last: EventId | None  # of the entries read (undecodable ones too), before a task filter
    full: bool  # as many as asked for: more may follow


def _page(connection: Connection, replay: Replay) -> _Page:
    """A page of the replay as frames for the connection (its task's events only, under
    a task filter); live events it covers are dropped from what waits. Where it ends,
    and whether more may follow, go by the entries read, undecodable ones included."""
    last = replay.last_read
    if last is None:
        return _Page([], None, full=False)
    connection.skip_through(last)
    task_id = connection.task_id
    transport = connection.transport
    frames = [d.frame(transport) for d in replay.events if task_id in (None, d.task_id)]
    return _Page(frames, last, full=replay.read == REPLAY_PAGE)
