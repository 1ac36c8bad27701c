"""What a client gets first, on real sockets: a resume from far back is read from the
history and written a page at a time, each page once the client has taken the one
before, so that a resume costs the worker at most a page whatever the history holds;
and the client still gets every event once, in order, or is told what it missed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from streamer.broker.base import Replay
from streamer.broker.memory import MemoryBroker
from streamer.connection import Connection, Limits
from streamer.events import progress_event
from streamer.hub import Hub
from streamer.opening import REPLAY_PAGE, Opening, read_opening, send_opening
from streamer.reasons import Reason
from streamer.wire import EventId, encode

from .test_hub import Peer, Routing, make_hub, read_messages, socket_connection
from .waiting import eventually

STEP = "x" * 1000  # events of about 1.2 KiB: a page fills the small socket buffer below
MISSED = 2 * REPLAY_PAGE + REPLAY_PAGE // 2


def snapshot_frame(message: str, position: EventId) -> bytes:
    return encode(message, "websocket", position, "active_tasks")


def count_replays(broker: MemoryBroker) -> list[int | None]:
    """The limit of each replay read from now on."""
    limits: list[int | None] = []
    replay: Callable[..., Awaitable[Replay]] = broker.replay

    async def counted(user_id: str, after: str, limit: int | None = None) -> Replay:
        limits.append(limit)
        return await replay(user_id, after, limit)

    broker.replay = counted  # type: ignore[method-assign]
    return limits


@asynccontextmanager
async def resuming(
    broker: MemoryBroker,
    hub: Hub,
    resume_point: str,
    *,
    limits: Limits | None = None,
    send_buffer: int | None = 4096,
) -> AsyncIterator[tuple[Connection, Peer, asyncio.Transport, Opening]]:
    """A client of user "u" resuming from `resume_point`, its opening read (snapshot and
    first page), on a socket whose small buffer makes each page wait for the client."""
    async with socket_connection("u", broker=broker, limits=limits, send_buffer=send_buffer) as (
        connection,
        peer,
        transport,
    ):
        await hub.attach(connection)
        opening = await read_opening(
            broker, connection, last_event_id=resume_point, encode_snapshot=snapshot_frame
        )
        yield connection, peer, transport, opening


async def published(broker: MemoryBroker, user: str, count: int) -> list[str]:
    return [
        str(
            await broker.publish(
                progress_event(user, f"t{n % 3}", progress=n % 100, current_step=STEP)
            )
        )
        for n in range(count)
    ]


async def test_a_long_replay_is_written_a_page_at_a_time_once_the_client_took_the_last() -> None:
    broker = MemoryBroker(history_size=1000, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    missed = await published(broker, "u", MISSED)
    replays = count_replays(broker)
    hub = make_hub(Routing())
    await broker.start(hub)  # live events reach the hub as they are published
    limits = Limits(max_events=50, max_bytes=1 << 20, send_timeout_s=30)
    async with resuming(broker, hub, resume_point, limits=limits) as (
        connection,
        peer,
        transport,
        opening,
    ):
        assert opening.replayed == REPLAY_PAGE and opening.more
        sending = asyncio.create_task(send_opening(broker, connection, opening))
        # The first page is written, and the next is not read while the client has
        # not taken it: the socket is backed up, nothing more is in the worker.
        await eventually(lambda: connection.sent == 1 + REPLAY_PAGE, what="the first page")
        assert transport.get_write_buffer_size() > 0
        assert not sending.done() and replays == [REPLAY_PAGE]
        live = await published(broker, "u", 1)  # published meanwhile: waits its turn
        messages = await read_messages(peer, 1 + MISSED + 1)
        assert await asyncio.wait_for(sending, 5) == MISSED + 1  # the live one was in page 3
        assert replays == [REPLAY_PAGE] * 3
        assert connection.live and connection.close_reason is None
    snapshot, *events = messages
    assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is True
    assert [event["id"] for event in events] == missed + live


async def test_a_client_that_does_not_take_its_replay_is_cut_off_after_the_send_timeout() -> None:
    broker = MemoryBroker(history_size=1000, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    await published(broker, "u", MISSED)
    replays = count_replays(broker)
    hub = make_hub(Routing())
    limits = Limits(max_events=50, max_bytes=1 << 20, send_timeout_s=0.5)
    async with resuming(broker, hub, resume_point, limits=limits) as (connection, peer, _, opening):
        sent = await asyncio.wait_for(send_opening(broker, connection, opening), 5)
        assert connection.close_reason is Reason.STALLED
        assert sent == REPLAY_PAGE and replays == [REPLAY_PAGE]  # the first page only
        assert peer.closed_with == [Reason.STALLED]


async def test_a_replay_the_history_moved_past_ends_the_stream_and_the_resume_says_so() -> None:
    """Between two pages the history was trimmed past where the client stands: the
    stream ends (4008 / end of stream), and the client, resuming from the last event it
    got, is told it missed some (`recovered: false`)."""
    size = REPLAY_PAGE + REPLAY_PAGE // 2
    broker = MemoryBroker(history_size=size, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    first_page = (await published(broker, "u", size - 1))[:REPLAY_PAGE]
    hub = make_hub(Routing())
    async with resuming(broker, hub, resume_point, send_buffer=None) as (
        connection,
        peer,
        _,
        opening,
    ):
        await published(broker, "u", size)  # a fast producer: what follows the page is gone
        assert await send_opening(broker, connection, opening) == REPLAY_PAGE
        assert connection.close_reason is Reason.OVERFLOW
        _, *events = await read_messages(peer, 1 + REPLAY_PAGE)
        assert [event["id"] for event in events] == first_page
    async with resuming(broker, hub, first_page[-1], send_buffer=None) as (
        resumed,
        peer,
        _,
        opening,
    ):
        await send_opening(broker, resumed, opening)
        (snapshot, *_) = await read_messages(peer, 1)
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False


async def test_data_lost_between_two_pages_sends_a_fresh_snapshot_after_the_first() -> None:
    broker = MemoryBroker(history_size=1000, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    missed = await published(broker, "u", MISSED)
    hub = make_hub(Routing())
    async with resuming(broker, hub, resume_point) as (connection, peer, _, opening):
        sending = asyncio.create_task(send_opening(broker, connection, opening))
        await eventually(lambda: connection.sent == 1 + REPLAY_PAGE, what="the first page")
        hub.reset("u")  # the broker lost its data while the client read the first page
        messages: list[dict[str, Any]] = await read_messages(peer, 1 + REPLAY_PAGE + 1)
        await asyncio.wait_for(sending, 5)
    first, *events, fresh = messages
    assert first["recovered"] is True
    assert [event["id"] for event in events] == missed[:REPLAY_PAGE]
    assert fresh["type"] == "active_tasks" and fresh["recovered"] is False


async def test_more_live_events_than_the_buffer_holds_while_the_replay_is_read_all_arrive() -> None:
    """A client that reads its replay at full speed while its user's events flow in
    faster than its buffer holds them: nothing is cut off, every event arrives once and
    in order, those that did not fit read from the history after the replay."""
    broker = MemoryBroker(history_size=1000, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    missed = await published(broker, "u", REPLAY_PAGE + 20)
    hub = make_hub(Routing())
    await broker.start(hub)
    limits = Limits(max_events=20, max_bytes=1 << 20, send_timeout_s=30)
    async with resuming(broker, hub, resume_point, limits=limits) as (connection, peer, _, opening):
        sending = asyncio.create_task(send_opening(broker, connection, opening))
        await eventually(lambda: connection.sent == 1 + REPLAY_PAGE, what="the first page")
        live = await published(broker, "u", 3 * limits.max_events)  # more than it holds
        assert connection.dropped > 0
        messages = await read_messages(peer, 1 + len(missed) + len(live))
        await asyncio.wait_for(sending, 5)
        assert connection.live and connection.close_reason is None
        later = await published(broker, "u", 2)  # live from now on
        messages += await read_messages(peer, 2)
    _, *events = messages
    assert [event["id"] for event in events] == missed + live + later


async def test_a_client_gone_during_its_replay_is_not_sent_the_rest() -> None:
    broker = MemoryBroker(history_size=5000, history_ttl=60)
    (resume_point,) = await published(broker, "u", 1)
    await published(broker, "u", 20 * REPLAY_PAGE)
    replays = count_replays(broker)
    hub = make_hub(Routing())
    async with resuming(broker, hub, resume_point) as (connection, peer, _, opening):
        sending = asyncio.create_task(send_opening(broker, connection, opening))
        await eventually(lambda: connection.sent == 1 + REPLAY_PAGE, what="the first page")
        peer.sock.close()  # the client goes away
        await asyncio.wait_for(sending, 10)
        assert connection.close_reason is Reason.CLIENT_CLOSED
        assert len(replays) <= 2  # not the twenty pages of its history
