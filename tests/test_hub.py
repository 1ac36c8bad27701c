"""The hub and the per-connection write path on real sockets: limits, routing counts,
order and duplicates, write-through, coalescing under back-pressure, bounded buffers."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from streamer import connection as connection_module
from streamer import hub as hub_module
from streamer.broker.base import Broker, BrokerUnavailable, Snapshot
from streamer.broker.memory import MemoryBroker
from streamer.connection import Connection, Limits
from streamer.events import progress_event
from streamer.hub import Hub
from streamer.reasons import Reason, Refused
from streamer.wire import Delivery, EventId, Transport, active_tasks, encode, ws_text_frame

from .waiting import eventually

EPOCH = "abcdef01"


def delivery(user: str, ms: int, size: int = 10, task: str = "t") -> Delivery:
    return Delivery(user, task, EventId(EPOCH, ms, 0), "task_progress", b"{" + b"x" * size + b"}")


@dataclass
class Routing:
    """What the hub asked the broker to route."""

    subscribed: list[str] = field(default_factory=list)
    unsubscribed: list[str] = field(default_factory=list)

    async def subscribe(self, user_id: str) -> None:
        self.subscribed.append(user_id)

    def unsubscribe(self, user_id: str) -> None:
        self.unsubscribed.append(user_id)


class ConfirmedLater(Routing):
    """A broker that confirms each subscription once `confirmed` is set."""

    def __init__(self, confirmed: asyncio.Event) -> None:
        super().__init__()
        self.confirmed = confirmed

    async def subscribe(self, user_id: str) -> None:
        await self.confirmed.wait()
        self.subscribed.append(user_id)


def make_hub(routing: Routing, *, max_connections: int = 10, per_user: int = 10) -> Hub:
    return Hub(
        subscribe=routing.subscribe,
        unsubscribe=routing.unsubscribe,
        max_connections=max_connections,
        max_connections_per_user=per_user,
        limits=Limits(max_events=100, max_bytes=1 << 20, send_timeout_s=5),
    )


@dataclass
class Peer:
    """The client end of a connection's socket."""

    sock: socket.socket
    closed_with: list[Reason] = field(default_factory=list)

    async def read(self, at_least: int) -> bytes:
        data = b""
        while len(data) < at_least:
            chunk = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recv(self.sock, 65536), 5
            )
            assert chunk, "the server end closed"
            data += chunk
        return data


def _frame_bounds(data: bytes) -> tuple[int, int] | None:
    """Where the payload of the unmasked frame at the start of `data` starts and ends,
    or None when it has not all come yet."""
    if len(data) < 2:
        return None
    length, start = data[1], 2
    if length == 126:
        length, start = int.from_bytes(data[2:4]), 4
    elif length == 127:
        length, start = int.from_bytes(data[2:10]), 10
    if len(data) < start + length:
        return None
    return start, start + length


def text_frames(data: bytes) -> list[dict[str, Any]] | None:
    """The JSON messages in unmasked WebSocket text frames, as servers send them; None
    while the last frame is incomplete."""
    messages = []
    while data:
        assert data[0] == 0x81, data[:2]
        bounds = _frame_bounds(data)
        if bounds is None:
            return None
        messages.append(json.loads(data[bounds[0] : bounds[1]]))
        data = data[bounds[1] :]
    return messages


async def read_messages(peer: Peer, count: int) -> list[dict[str, Any]]:
    """At least `count` messages, and all that came with them."""
    data = b""
    while True:
        messages = text_frames(data)
        if messages is not None and len(messages) >= count:
            return messages
        data += await peer.read(1)


def count_writes(transport: asyncio.Transport) -> list[int]:
    """The sizes of the transport's writes from now on."""
    writes: list[int] = []
    write = transport.write

    def counting_write(data: bytes | bytearray | memoryview) -> None:
        writes.append(len(data))
        write(data)

    transport.write = counting_write  # type: ignore[method-assign]
    return writes


@asynccontextmanager
async def socket_connection(
    user: str,
    *,
    limits: Limits | None = None,
    task_id: str | None = None,
    broker: Broker | None = None,
    send_buffer: int | None = None,
    transport: Transport = "websocket",
) -> AsyncIterator[tuple[Connection, Peer, asyncio.Transport]]:
    """A Connection writing to a real socket; the test holds the other end. `broker`:
    where a resync reads its snapshot; `send_buffer`: the kernel's for the socket."""
    server_end, client_end = socket.socketpair()
    if send_buffer is not None:
        server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    client_end.setblocking(False)
    _, writer = await asyncio.open_connection(sock=server_end)
    out = writer.transport
    peer = Peer(client_end)

    def close_transport(reason: Reason, backed_up: bool) -> None:
        peer.closed_with.append(reason)

    connection = Connection(
        user_id=user,
        task_id=task_id,
        transport=transport,
        out=out,  # type: ignore[arg-type]
        drain=writer.drain,
        close_transport=close_transport,  # type: ignore[arg-type]
        broker=broker,  # type: ignore[arg-type]  # None: no resync in the test
        limits=limits or Limits(max_events=100, max_bytes=1 << 20, send_timeout_s=5),
    )
    try:
        yield connection, peer, out  # type: ignore[misc]
    finally:
        connection.discard()
        writer.close()
        client_end.close()


async def attach_live(hub: Hub, connection: Connection, peer: Peer) -> None:
    """Count `connection` in and send its opening (`S`), which `peer` reads."""
    await hub.attach(connection)
    connection.go_live([b"S"])
    assert await peer.read(1) == b"S"


async def test_no_new_connections_once_shutting_down() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (first, _, _), socket_connection("u") as (second, _, _):
        await hub.attach(first)
        hub.close_all(Reason.SHUTDOWN)
        assert first.close_reason is Reason.SHUTDOWN
        with pytest.raises(Refused) as refused:
            await hub.attach(second)
        assert refused.value.reason is Reason.SHUTTING_DOWN


async def test_limits_count_open_connections_only() -> None:
    hub = make_hub(Routing(), max_connections=2, per_user=1)
    async with (
        socket_connection("a") as (a, _, _),
        socket_connection("a") as (a2, _, _),
        socket_connection("b") as (b, _, _),
        socket_connection("c") as (c, _, _),
    ):
        await hub.attach(a)
        with pytest.raises(Refused, match="too many connections for this user"):
            await hub.attach(a2)
        await hub.attach(b)
        with pytest.raises(Refused, match="too many connections"):
            await hub.attach(c)
        hub.detach(a, Reason.CLIENT_CLOSED)
        hub.detach(a, Reason.CLIENT_CLOSED)  # twice is harmless
        assert len(hub) == 1
        await hub.attach(c)


async def test_a_users_events_are_routed_here_while_one_of_their_connections_is() -> None:
    routing = Routing()
    hub = make_hub(routing)
    async with socket_connection("u") as (one, _, _), socket_connection("u") as (two, _, _):
        await hub.attach(one)
        await hub.attach(two)
        assert routing.subscribed == ["u"]  # once per user, not per connection
        hub.detach(one, Reason.CLIENT_CLOSED)
        assert routing.unsubscribed == []
        hub.detach(two, Reason.CLIENT_CLOSED)
        assert routing.unsubscribed == ["u"]


async def test_a_subscription_nobody_waits_for_any_more_is_given_up() -> None:
    """The only client of a user leaves while the broker has not yet routed the user
    here: the subscribing is stopped (a Redis Cluster shard would otherwise be asked
    again after a failover) and the route withdrawn."""
    routing = Routing()
    asked, stopped = asyncio.Event(), asyncio.Event()

    async def never_confirmed(user_id: str) -> None:
        asked.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    routing.subscribe = never_confirmed  # type: ignore[method-assign]
    hub = make_hub(routing)
    async with socket_connection("u") as (connection, _, _):
        attaching = asyncio.create_task(hub.attach(connection))
        await asyncio.wait_for(asked.wait(), 5)
        attaching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attaching
        await asyncio.wait_for(stopped.wait(), 5)
        assert routing.unsubscribed == ["u"]
        assert len(hub) == 0


async def test_a_connection_that_ended_is_not_kept_by_its_credentials_expiry() -> None:
    """Until its token would have expired, the hub still has an entry for it: that
    entry does not keep the ended connection (and its request, socket, buffers) alive."""
    hub = make_hub(Routing())
    async with socket_connection("u") as (connection, _, _):
        connection.expires_at = time.time() + 600
        await hub.attach(connection)
        hub.detach(connection, Reason.CLIENT_CLOSED)
        ended = weakref.ref(connection)
        del connection
    gc.collect()
    assert ended() is None
    hub.expire(time.time() + 1000)  # its entry's turn comes: nothing to close


async def test_resume_points_are_the_oldest_id_per_user() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (old, _, _), socket_connection("u") as (new, _, _):
        await hub.attach(old)
        await hub.attach(new)
        assert hub.resume_points() == {"u": None}  # one has nothing yet: all of it
        old.offer(delivery("u", 5))
        new.offer(delivery("u", 5))
        new.offer(delivery("u", 9))
        assert hub.resume_points() == {"u": EventId(EPOCH, 5, 0)}


async def test_a_task_filter_does_not_hold_its_users_catch_up_back() -> None:
    """A connection filtered to one task moves on only with that task's events; it was
    handed the others all the same, so the catch-up starts after the last event its
    user was handed here, not at the filtered connection's older position (from
    which it could be more than the history holds)."""
    hub = make_hub(Routing())
    async with (
        socket_connection("u") as (everything, _, _),
        socket_connection("u", task_id="x") as (one_task, _, _),
    ):
        for connection in (everything, one_task):
            await hub.attach(connection)
            connection.skip_through(EventId(EPOCH, 1, 0))
            connection.go_live([])
        hub.deliver_all([delivery("u", 5, task="x"), delivery("u", 7), delivery("u", 9)])
        assert one_task.last_id == EventId(EPOCH, 5, 0)
        assert hub.resume_points() == {"u": EventId(EPOCH, 9, 0)}


async def test_a_subscription_another_client_waits_for_goes_on_when_one_leaves() -> None:
    confirmed = asyncio.Event()
    routing = ConfirmedLater(confirmed)
    hub = make_hub(routing)
    async with socket_connection("u") as (leaving, _, _), socket_connection("u") as (staying, _, _):
        first = asyncio.create_task(hub.attach(leaving))
        second = asyncio.create_task(hub.attach(staying))
        await eventually(lambda: len(hub) == 2, what="both clients counted")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        confirmed.set()
        await asyncio.wait_for(second, 5)  # routed, not given up
        assert len(hub) == 1 and routing.unsubscribed == []


async def test_a_connection_still_opening_catches_up_from_its_users_last_event_here() -> None:
    """After a lost subscription, a connection without a snapshot yet needs only what
    came after the last event its user was handed here, not the whole history; only
    when none came (or the data it was in was lost) all of it."""
    hub = make_hub(Routing())
    async with socket_connection("u") as (live, _, _), socket_connection("u") as (opening, _, _):
        await hub.attach(live)
        live.skip_through(EventId(EPOCH, 1, 0))
        live.go_live([])
        await hub.attach(opening)
        assert hub.resume_points() == {"u": None}  # nothing handed here yet: all of it
        hub.deliver_all([delivery("u", 5), delivery("u", 7)])
        another = socket_connection("u")
        async with another as (newest, _, _):
            await hub.attach(newest)
            assert opening.last_id == EventId(EPOCH, 7, 0)  # queued while it opens
            assert newest.last_id is None
            assert hub.resume_points() == {"u": EventId(EPOCH, 7, 0)}
            hub.reset("u")  # the data lost: its ids say nothing of the new data
            assert hub.resume_points() == {"u": None}


async def test_a_user_whose_subscription_is_not_confirmed_yet_needs_no_catch_up() -> None:
    """Their connections read their snapshots after the subscription is confirmed:
    whatever a lost subscription missed is in those snapshots."""
    confirmed = asyncio.Event()
    routing = ConfirmedLater(confirmed)
    hub = make_hub(routing)
    async with socket_connection("u") as (connection, _, _):
        attaching = asyncio.create_task(hub.attach(connection))
        await asyncio.sleep(0)
        assert not attaching.done() and len(hub) == 1
        assert hub.resume_points() == {}
        confirmed.set()
        await asyncio.wait_for(attaching, 5)
        assert hub.resume_points() == {"u": None}


async def test_each_event_once_and_in_order() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (connection, peer, _):
        await hub.attach(connection)
        connection.go_live([b"<snapshot>"])
        assert await peer.read(len(b"<snapshot>")) == b"<snapshot>"
        sent = []
        for ms in (5, 9, 9, 7, 12):  # a duplicate and an older one, as at a replay seam
            hub.deliver(delivery("u", ms))
            sent.append(ms)
        hub.deliver(delivery("someone-else", 20))
        frames = [delivery("u", ms).ws_frame for ms in (5, 9, 12)]
        await asyncio.sleep(0)  # the end of this turn of the event loop: written
        assert await peer.read(sum(map(len, frames))) == b"".join(frames)
        assert connection.sent == 4  # the snapshot and three events


async def test_each_event_once_and_in_order_when_read_together() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (connection, peer, transport):
        await attach_live(hub, connection, peer)
        writes = count_writes(transport)
        hub.deliver_all([delivery("u", ms) for ms in (5, 9, 9, 7, 12)])
        hub.deliver_all([delivery("u", ms) for ms in (12, 3, 14)])
        frames = [delivery("u", ms).ws_frame for ms in (5, 9, 12, 14)]
        assert writes == [sum(len(f) for f in frames[:3]), len(frames[3])]
        assert await peer.read(sum(writes)) == b"".join(frames)
        assert connection.sent == 5


async def test_events_that_arrive_together_leave_in_one_write() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (connection, peer, transport):
        await attach_live(hub, connection, peer)
        writes = count_writes(transport)
        burst = [delivery("u", ms) for ms in range(1, 21)]
        for event in burst:  # a burst read from Redis in one go
            hub.deliver(event)
        assert writes == []
        await asyncio.sleep(0)
        assert writes == [sum(len(e.ws_frame) for e in burst)]
        hub.deliver(lone := delivery("u", 30))
        await asyncio.sleep(0)
        assert writes[1:] == [len(lone.ws_frame)]
        assert await peer.read(writes[0] + writes[1]) == b"".join(
            e.ws_frame for e in [*burst, lone]
        )


async def test_a_users_events_read_together_reach_each_transport_in_one_write() -> None:
    """Each connection of the user gets the events of one read in its own transport's
    frames, in one write; those seen already (a connection that resumed further on) and
    other users' events are not sent."""
    hub = make_hub(Routing())
    async with (
        socket_connection("u") as (ws, ws_peer, ws_out),
        socket_connection("u", transport="sse") as (sse, sse_peer, sse_out),
        socket_connection("u") as (ahead, ahead_peer, ahead_out),
    ):
        for connection, peer in ((ws, ws_peer), (sse, sse_peer), (ahead, ahead_peer)):
            await attach_live(hub, connection, peer)
        ahead.skip_through(EventId(EPOCH, 3, 0))
        writes = [count_writes(out) for out in (ws_out, sse_out, ahead_out)]
        read = [delivery("u", ms) for ms in (2, 3, 4, 5)]
        hub.deliver_all([read[0], delivery("someone-else", 1), *read[1:]])
        expected = [
            b"".join(e.ws_frame for e in read),
            b"".join(e.sse_chunk for e in read),
            b"".join(e.ws_frame for e in read[2:]),
        ]
        assert writes == [[len(frames)] for frames in expected]
        for peer, frames in zip((ws_peer, sse_peer, ahead_peer), expected, strict=True):
            assert await peer.read(len(frames)) == frames
        assert (ws.sent, sse.sent, ahead.sent) == (5, 5, 3)
        assert ws.last_id == sse.last_id == ahead.last_id == read[-1].event_id
        assert hub.resume_points() == {"u": read[-1].event_id}


async def test_events_read_together_are_written_at_once_in_one_write_each() -> None:
    """What the broker read in one go leaves before the hub returns: one write per
    connection (no wait for the end of the turn), after what `deliver` left waiting."""
    hub = make_hub(Routing())
    async with (
        socket_connection("u") as (first, first_peer, first_transport),
        socket_connection("u") as (second, second_peer, second_transport),
    ):
        for connection, peer in ((first, first_peer), (second, second_peer)):
            await attach_live(hub, connection, peer)
        writes = [count_writes(first_transport), count_writes(second_transport)]
        hub.deliver(earlier := delivery("u", 1))
        read = [delivery("u", ms) for ms in range(2, 12)]
        hub.deliver_all([*read, delivery("someone-else", 20)])
        expected = [earlier, *read]
        assert writes == [[sum(len(e.ws_frame) for e in expected)]] * 2
        for peer in (first_peer, second_peer):
            assert await peer.read(writes[0][0]) == b"".join(e.ws_frame for e in expected)
        await asyncio.sleep(0)  # what `deliver` scheduled finds nothing left to write
        assert writes == [[writes[0][0]]] * 2
        assert first.sent == second.sent == 1 + len(expected)


async def test_events_wait_for_the_snapshot_and_skip_what_it_covers() -> None:
    hub = make_hub(Routing())
    async with socket_connection("u") as (connection, peer, _):
        await hub.attach(connection)
        for ms in (3, 6, 8):  # arrive while the snapshot is being read
            hub.deliver(delivery("u", ms))
        connection.skip_through(EventId(EPOCH, 6, 0))  # the snapshot reflects up to 6
        connection.go_live([b"S"])
        expected = b"S" + delivery("u", 8).ws_frame
        assert await peer.read(len(expected)) == expected


async def test_events_queued_behind_a_backed_up_socket_leave_in_one_write() -> None:
    hub = make_hub(Routing())
    limits = Limits(max_events=10_000, max_bytes=64 << 20, send_timeout_s=10)
    async with socket_connection("u", limits=limits) as (connection, peer, transport):
        await hub.attach(connection)
        connection.go_live([b"S"])
        writes = count_writes(transport)
        # The client reads nothing: the socket fills up, then asyncio's buffer passes
        # its high-water mark and writing pauses.
        big = [delivery("u", ms, size=64 * 1024) for ms in range(1, 1000)]
        sent_big = 0
        while transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]:
            hub.deliver(big[sent_big])
            sent_big += 1
            await asyncio.sleep(0)
        written_through = len(writes)
        assert written_through == sent_big
        queued = [delivery("u", 1000 + n, size=100) for n in range(50)]
        for event in queued:
            hub.deliver(event)
            await asyncio.sleep(0)
        assert len(writes) == written_through, "nothing is written while the socket is backed up"

        expected = b"S" + b"".join(e.ws_frame for e in big[:sent_big] + queued)
        assert await peer.read(len(expected)) == expected  # reading lets the socket drain
        assert writes[written_through:] == [sum(len(e.ws_frame) for e in queued)], (
            "the 50 queued events left in one write"
        )
        assert connection.sent == 1 + sent_big + 50


async def test_a_client_over_its_byte_budget_is_cut_off() -> None:
    hub = make_hub(Routing())
    budget = 300 * 1024
    limits = Limits(max_events=1000, max_bytes=budget, send_timeout_s=10)
    async with socket_connection("u", limits=limits) as (connection, peer, transport):
        await hub.attach(connection)
        connection.go_live([b"S"])
        offered = 0
        while connection.close_reason is None:
            offered += 1
            assert offered < 10_000, "never cut off"
            hub.deliver(delivery("u", offered, size=64 * 1024))
            await asyncio.sleep(0)
        assert connection.close_reason is Reason.OVERFLOW
        assert peer.closed_with == [Reason.OVERFLOW]
        # What the client was not reading: the kernel's socket buffers, asyncio's up to
        # its high-water mark, then at most the budget; then it was cut off.
        kernel = transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        kernel += peer.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        high_water = transport.get_write_buffer_limits()[1]
        assert offered * 64 * 1024 <= kernel + high_water + budget + 2 * 65 * 1024


def json_delivery(user: str, ms: int, task: str = "t") -> Delivery:
    event_id = EventId(EPOCH, ms, 0)
    data = json.dumps({"type": "task_progress", "id": str(event_id), "task_id": task})
    return Delivery(user, task, event_id, "task_progress", data.encode())


async def live_connection(
    hub: Hub, connection: Connection, peer: Peer, broker: MemoryBroker
) -> dict[str, Any]:
    """Attached and past its opening snapshot (read from `broker`), as a handler does."""
    await hub.attach(connection)
    snapshot = await broker.snapshot(connection.user_id)
    connection.skip_through(snapshot.position)
    connection.go_live([wire_snapshot(snapshot.position)])
    (first,) = await read_messages(peer, 1)
    return first


def wire_snapshot(position: EventId) -> bytes:
    message = active_tasks([], position=position, recovered=True, truncated=False)
    return encode(message, "websocket", position, "active_tasks")


async def test_data_lost_while_the_opening_was_read_sends_a_fresh_snapshot_instead() -> None:
    """The broker lost its data after the opening snapshot was read and before it was
    sent: that snapshot is outdated, so the client gets a fresh one, `recovered:
    false`, and never the outdated one."""
    broker = MemoryBroker(history_size=10, history_ttl=60)
    hub = make_hub(Routing())
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        await hub.attach(connection)
        old = EventId("0ld0ld00", int(time.time() * 1000) + 10**6, 0)
        connection.skip_through(old)  # the opening read this, of the old data
        connection.resync()  # the hub: the broker lost its data
        connection.go_live([wire_snapshot(old)])  # the handler, with what it read
        hub.deliver(new := json_delivery("u", int(time.time() * 1000) + 1000))
        snapshot, event = await read_messages(peer, 2)
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
        assert snapshot["id"] != str(old)
        # The new data's ids are lower than the old ones: its events still come.
        assert event["id"] == str(new.event_id)


class FailingSnapshots(MemoryBroker):
    """A broker whose first `failures` snapshot reads fail, as on the connections of a
    pool that a restarted Redis closed."""

    def __init__(self, failures: int) -> None:
        super().__init__(history_size=10, history_ttl=60)
        self.failures = failures
        self.reads = 0

    async def snapshot(
        self, user_id: str, task_id: str | None = None, *, at_least: EventId | None = None
    ) -> Snapshot:
        self.reads += 1
        if self.reads <= self.failures:
            raise BrokerUnavailable("Connection closed by server.")
        return await super().snapshot(user_id, task_id, at_least=at_least)


async def test_a_resync_tries_its_snapshot_again_before_it_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection_module, "BROKER_RETRY_PAUSE_S", 0.01)
    broker = FailingSnapshots(failures=0)
    hub = make_hub(Routing())
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        await live_connection(hub, connection, peer, broker)
        broker.reads, broker.failures = 0, 2
        connection.resync()
        (snapshot,) = await read_messages(peer, 1)
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False
        assert broker.reads == 3 and connection.close_reason is None

    monkeypatch.setattr(connection_module, "BROKER_RETRY_S", 0.1)
    broker = FailingSnapshots(failures=10**6)
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        connection.go_live([])
        connection.resync()
        assert await connection.ended() is Reason.BROKER_UNAVAILABLE
        assert peer.closed_with == [Reason.BROKER_UNAVAILABLE] and broker.reads > 1


async def test_replies_that_wait_during_a_resync_are_sent_before_the_fresh_snapshot() -> None:
    """None is dropped as covered by the snapshot, and none computed from the lost
    data (a `get_active_tasks` answer above all) comes after the fresh snapshot."""
    broker = MemoryBroker(history_size=10, history_ttl=60)
    hub = make_hub(Routing())
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        await live_connection(hub, connection, peer, broker)
        connection.resync()
        connection.send(ws_text_frame(b'{"type":"pong"}'))  # the answer to a ping
        reply, snapshot = await read_messages(peer, 2)
        assert reply == {"type": "pong"}
        assert snapshot["type"] == "active_tasks" and snapshot["recovered"] is False


async def test_events_collected_before_a_snapshot_request_are_sent_before_it() -> None:
    """An event the hub handed over this turn, not yet written, is the client's already:
    it goes out ahead of the snapshot the client then asks for, not after it with an
    id no newer than the snapshot's."""
    broker = MemoryBroker(history_size=10, history_ttl=60)
    hub = make_hub(Routing())
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        await live_connection(hub, connection, peer, broker)
        early = json_delivery("u", int(time.time() * 1000) + 1000)
        assert connection.offer(early)  # to be written at the end of this turn
        await connection.refresh()
        connection.write_batch()  # the end of the turn
        event, snapshot = await read_messages(peer, 2)
        assert event["id"] == str(early.event_id)
        assert snapshot["type"] == "active_tasks" and snapshot["id"] == str(early.event_id)


async def test_a_snapshot_larger_than_the_client_buffer_reaches_a_client_that_reads() -> None:
    """The buffer bounds what waits for a client that does not read; a large answer to
    a client that does is written, as any reply, also when it asks again before it has
    read the first one (the socket still backed up by it)."""
    broker = MemoryBroker(history_size=10, history_ttl=60)
    for n in range(100):
        await broker.publish(progress_event("u", f"t{n}", current_step="x" * 1000))
    hub = make_hub(Routing())
    limits = Limits(max_events=100, max_bytes=1000, send_timeout_s=5)
    async with socket_connection("u", broker=broker, limits=limits, send_buffer=4096) as (
        connection,
        peer,
        transport,
    ):
        await live_connection(hub, connection, peer, broker)
        size = await connection.refresh()
        assert size > 100_000
        assert transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]
        assert await connection.refresh() == size
        assert connection.close_reason is None
        answers = await read_messages(peer, 2)
        assert [len(answer["tasks"]) for answer in answers] == [100, 100]


async def test_after_a_resync_events_of_the_new_data_come_though_their_ids_are_lower() -> None:
    """A replica promoted after a failover may have a clock behind the old master's: the
    ids of its events are lower than those the client got before. They are not taken
    for duplicates."""
    broker = MemoryBroker(history_size=10, history_ttl=60)
    hub = make_hub(Routing())
    async with socket_connection("u", broker=broker) as (connection, peer, _):
        await live_connection(hub, connection, peer, broker)
        now_ms = int(time.time() * 1000)
        hub.deliver(json_delivery("u", now_ms + 10**6))  # the old master's clock, ahead
        await read_messages(peer, 1)
        connection.resync()
        hub.deliver(new := json_delivery("u", now_ms + 1000))
        snapshot, event = await read_messages(peer, 2)
        assert snapshot["recovered"] is False
        assert event["id"] == str(new.event_id)


async def test_a_waiter_given_up_leaves_the_others_waiting_for_the_end() -> None:
    """`ended()` is not shielded (a shield costs every stream memory for its life):
    a waiter cancelled cancels the future they share, and the others, not cancelled
    themselves, go on waiting; a later waiter still learns the end."""
    async with socket_connection("u") as (connection, _, _):
        given_up = asyncio.ensure_future(connection.ended())
        waiting = asyncio.ensure_future(connection.ended())
        await asyncio.sleep(0)
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        await asyncio.sleep(0)
        assert not waiting.done()
        late = asyncio.ensure_future(connection.ended())
        await asyncio.sleep(0)
        connection.lost()
        assert await asyncio.wait_for(waiting, 5) is Reason.CLIENT_CLOSED
        assert await asyncio.wait_for(late, 5) is Reason.CLIENT_CLOSED
        assert await connection.ended() is Reason.CLIENT_CLOSED


def test_a_round_does_not_keep_the_streams_that_ended_until_their_turn() -> None:
    """A round (a ping every 30 s, a heartbeat every 15 s) listed every stream when it
    began and visited a slice per tick: a stream that ended meanwhile was kept until
    its turn, for every client that came and went in that time."""

    class Stream:
        close_reason: Reason | None = None

    streams = [Stream() for _ in range(10)]
    visited: list[Stream] = []
    round_ = hub_module._Round(10.0, 1.0, visited.extend, start=0.0)  # type: ignore[arg-type]
    round_.advance(10.0, lambda: streams)  # type: ignore[arg-type,return-value]
    assert visited == streams[:1]  # one per tick
    ended = weakref.ref(streams[9])
    streams[8].close_reason = Reason.CLIENT_CLOSED
    del streams[9]
    gc.collect()
    assert ended() is None
    for now in range(11, 20):
        round_.advance(float(now), list)
    assert visited == streams[:8]
