"""One client's stream: what both transports do between the hub and the socket.

Events are written through: the hub hands a connection an event's pre-encoded frame and
the connection writes it straight to its socket when nothing is queued and the socket
is not backed up. Otherwise the frame waits in a bounded outbox, and everything queued
leaves in one write once the socket drains. No task per event, no lock per send: the
only task of a connection is its request handler (plus, while a backed-up socket
drains, a short-lived flusher).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .broker.base import Broker, BrokerUnavailable
from .reasons import Reason
from .wire import SSE_HEARTBEAT, WS_PING, Delivery, EventId, Transport, active_tasks, encode

# How often a backed-up socket is looked at again while it drains (its drain waiter
# normally wakes the flusher first), and the pause after a drain wait that ended early.
DRAIN_CHECK_S = 1.0
DRAIN_RETRY_S = 0.05
# How long a read from the broker that a stream waits for (a page of its replay, a
# fresh snapshot) is tried again while the broker is unavailable, and how often.
BROKER_RETRY_S = 10.0
BROKER_RETRY_PAUSE_S = 0.5
T = TypeVar("T")
# The key of a command reply waiting in the outbox: no snapshot covers it.
REPLY_KEY = -1


@dataclass(frozen=True)
class Limits:
    """How much a client that does not keep up may cost before it is cut off."""

    max_events: int
    max_bytes: int
    send_timeout_s: float


class Connection:
    __slots__ = (
        "__weakref__",
        "_batch",
        "_broker",
        "_close_transport",
        "_done",
        "_drain",
        "_flusher",
        "_high_water",
        "_last_key",
        "_limits",
        "_live",
        "_opened",
        "_out",
        "_passed",
        "_pending",
        "_pending_bytes",
        "_resets",
        "_resyncing",
        "_stale",
        "answering",
        "bytes_out",
        "close_reason",
        "closing",
        "dropped",
        "expires_at",
        "heard",
        "heartbeat",
        "last_id",
        "opened_at",
        "sent",
        "task_id",
        "transport",
        "user_id",
    )

    def __init__(
        self,
        *,
        user_id: str,
        task_id: str | None,
        transport: Transport,
        out: asyncio.Transport,
        drain: Callable[[], Awaitable[None]],
        close_transport: Callable[[Reason, bool], asyncio.Future[object] | None],
        broker: Broker,
        limits: Limits,
        expires_at: float | None = None,
    ) -> None:
        self.user_id = user_id
        self.task_id = task_id
        self.transport: Transport = transport
        self._out = out
        self._high_water = max(out.get_write_buffer_limits()[1], 1)
        self._drain = drain
        self._close_transport = close_transport
        self._broker = broker  # for a fresh snapshot when the broker lost its data
        self._limits = limits
        self._live = False
        # (id key, frame) of what waits: events before the snapshot is sent, and
        # anything while the socket is backed up.
        self._pending: list[tuple[int, bytes]] | None = None
        self._batch: list[tuple[int, bytes]] | None = None  # arrived together, written together
        self._pending_bytes = 0
        self._last_key = -1
        self._flusher: asyncio.Task[None] | None = None
        self._opened = False  # the handler sent what the client gets first
        # After the broker lost its data: the fresh snapshot being read (events wait
        # meanwhile), whether the data was lost (again) since that read began, and
        # how many times it was lost.
        self._resyncing: asyncio.Task[int] | None = None
        self._stale = False
        self._resets = 0
        self._done: asyncio.Future[Reason] | None = None
        self.expires_at = expires_at  # when its credentials end (the hub keeps the time)
        self.heard = True  # from the client since the last ping round (WebSocket)
        # What the hub's clock writes now and then (an SSE heartbeat, a WebSocket ping).
        self.heartbeat = SSE_HEARTBEAT if transport == "sse" else WS_PING
        # A command waits for the broker: the client's pongs wait unread meanwhile.
        self.answering = False
        self.last_id: EventId | None = None  # the newest id sent or queued: the position
        self._passed: EventId | None = None  # under a task filter: another task's, newer
        self.sent = 0  # events written
        self.bytes_out = 0  # bytes written by the hub and the opening (the access log's)
        # Times events waiting for the opening were dropped (more came than the outbox
        # holds): the opening reads them from the history instead.
        self.dropped = 0
        self.opened_at = time.monotonic()
        self.close_reason: Reason | None = None
        self.closing: asyncio.Future[object] | None = None  # a close the transport runs

    @property
    def live(self) -> bool:
        """Past its snapshot and replay: events are written as they come."""
        return self._live

    # --- what the hub calls --------------------------------------------------------------

    def offer(self, delivery: Delivery) -> bool:
        """An event of this connection's user, in publish order; duplicates (the
        replay/live seam) and other tasks' events under a filter are dropped here.

        A live connection collects what arrives together and `write_batch()` sends it
        in one write; True when this event started such a batch.
        """
        if self.task_id is not None and delivery.task_id != self.task_id:
            if delivery.event_id.key > self._last_key and self.close_reason is None:
                self._passed = delivery.event_id
            return False
        key = delivery.event_id.key
        if key <= self._last_key or self.close_reason is not None:
            return False
        self._last_key = key
        self.last_id = delivery.event_id
        frame = delivery.frame(self.transport)
        if not self._live or self._pending is not None:
            self._queue(key, frame)
            return False
        batch = self._batch
        if batch is None:
            self._batch = [(key, frame)]
            return True
        batch.append((key, frame))
        return False

    def write_through(self, first_key: int, last: EventId, count: int, frames: bytes) -> bool:
        """`count` events of this connection's user that arrived together, from the one
        whose id key is `first_key` to `last`, as `frames` (joined): written at once if
        this connection takes them all as they come (live, no task filter, nothing
        waiting, none of them seen, the socket not backed up); else False, and nothing
        was done: `offer` sorts them one by one."""
        if (
            self.task_id is not None
            or not self._live
            or self._pending is not None
            or self._batch is not None
            or first_key <= self._last_key
            or self.close_reason is not None
        ):
            return False
        out = self._out
        if out.is_closing() or out.get_write_buffer_size() >= self._high_water:
            return False
        self._last_key = last.key
        self.last_id = last
        out.write(frames)
        self.sent += count
        self.bytes_out += len(frames)
        return True

    def write_batch(self) -> None:
        """Write what `offer` collected: one write, whatever the number of events, or
        into the outbox when the socket is backed up."""
        batch, self._batch = self._batch, None
        if batch is None or self.close_reason is not None:
            return
        if self._out.is_closing():
            self.lost()
        elif self._pending is not None or self._backed_up():
            for key, frame in batch:
                self._queue(key, frame)
        else:
            data = batch[0][1] if len(batch) == 1 else b"".join(f for _, f in batch)
            self._out.write(data)
            self.sent += len(batch)
            self.bytes_out += len(data)

    def write_idle(self, data: bytes) -> bool:
        """Write what only matters when nothing else is being sent (a heartbeat or a
        ping); True when it was written."""
        if self._out.is_closing():
            self.lost()
        elif self._live and self._pending is None and not self._backed_up():
            self._out.write(data)
            self.bytes_out += len(data)
            return True
        return False

    def check(self) -> None:
        """Notice a client that went away while nothing was sent to it."""
        if self._out.is_closing():
            self.lost()

    def lost(self) -> None:
        """The client went away: the handler, waiting in `ended()`, ends the stream."""
        if self.close_reason is None:
            self.close_reason = Reason.CLIENT_CLOSED
            self._pending, self._pending_bytes = None, 0
        self._resolve_done()

    async def ended(self) -> Reason:
        """Wait until the connection ends; why it did."""
        # Not shielded (a shield costs each stream a future and two callbacks for its
        # whole life): a waiter given up cancels the future, and the others, which were
        # not cancelled themselves, wait on a new one.
        while self.close_reason is None:
            if self._done is None or self._done.cancelled():
                self._done = asyncio.get_running_loop().create_future()
            try:
                return await self._done
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
        return self.close_reason

    def _resolve_done(self) -> None:
        if self._done is not None and not self._done.done():
            assert self.close_reason is not None
            self._done.set_result(self.close_reason)

    def resync(self) -> None:
        """The broker lost its data: send a fresh snapshot with `recovered: false`. What
        waits of the old data is dropped (the snapshot replaces it), and ids start over:
        the new data's may be lower."""
        if self.close_reason is not None:
            return
        self.write_batch()  # what this turn collected came before
        if self.close_reason is not None:
            return
        self._live = False  # events wait behind the new snapshot
        self._stale = True
        self._resets += 1
        self._last_key = -1
        self._passed = None
        if self._pending is not None:
            replies = [(k, f) for k, f in self._pending if k == REPLY_KEY]
            self._pending = replies or None
            self._pending_bytes = sum(len(f) for _, f in replies)
        if self._opened:  # otherwise the handler's opening, outdated now, starts it
            self._resync_soon()

    async def refresh(self) -> int:
        """The client asked for its tasks (`get_active_tasks`): a fresh snapshot, where
        the client stands. Events that come while it is read wait and follow it, those
        it already holds included (a `task_completed` is never skipped), so that the
        client's view never goes back. Returns its size in bytes; raises
        BrokerUnavailable (the stream goes on)."""
        if self.close_reason is not None:
            return 0
        if self._resyncing is not None:  # its snapshot, coming, is the answer
            return await self._resyncing
        self.write_batch()  # what this turn collected came before
        if self.close_reason is not None:
            return 0
        position, resets = self.last_id, self._resets
        assert position is not None, "asked before the opening snapshot was sent"
        self._live = False
        before = len(self._pending or ())  # what waited already goes out first
        try:
            snapshot = await self._broker.snapshot(self.user_id, self.task_id)
        except Exception as exc:
            if self._resets == resets and self.close_reason is None:
                self._resume()
            raise BrokerUnavailable(str(exc)) from exc
        if self._resets != resets or self.close_reason is not None:
            return 0  # the data was lost meanwhile: the resync's snapshot answers
        message = active_tasks(
            snapshot.tasks, position=position, recovered=True, truncated=snapshot.truncated
        )
        frame = encode(message, self.transport, position, "active_tasks")
        pending = self._pending or []
        # What already waits for a client that reads nothing is bounded; the answer
        # itself (bounded in size, and charged to the rate limit by it) is not, so
        # that one larger than the buffer still reaches a client that reads.
        if self._backed_up() and (
            len(pending) >= self._limits.max_events or self._pending_bytes > self._limits.max_bytes
        ):
            self.close(Reason.OVERFLOW)
            return 0
        self._pending = [*pending[:before], (REPLY_KEY, frame), *pending[before:]]
        self._pending_bytes += len(frame)
        self._resume()
        return len(frame)

    def close(self, reason: Reason) -> None:
        """End the stream from the server's side, with the transport's signal for it."""
        if self.close_reason is not None:
            return
        self.close_reason = reason
        self._pending, self._pending_bytes = None, 0
        backed_up = reason in (Reason.STALLED, Reason.UNRESPONSIVE) or self._backed_up()
        self.closing = self._close_transport(reason, backed_up)
        self._resolve_done()

    def discard(self) -> None:
        """The connection is gone: nothing more is sent, timers and helpers stop."""
        if self.close_reason is None:
            self.close_reason = Reason.CLIENT_CLOSED
        self._pending = None
        for task in (self._flusher, self._resyncing):
            if task is not None:
                task.cancel()
        self._resolve_done()

    # --- what the transport handler calls ------------------------------------------------

    def passed_through(self) -> EventId | None:
        """Under a task filter, the newest event of another task that went by after the
        last one written, when everything this connection was given has been written:
        a client holding what was written has seen the user's events up to it. None
        otherwise."""
        passed = self._passed
        if (
            passed is None
            or self.close_reason is not None  # its own task's events are dropped since
            or not self._live
            or self._stale
            or self._pending is not None
            or self._batch is not None
            or (self.last_id is not None and passed <= self.last_id)
        ):
            return None
        return passed

    def skip_through(self, event_id: EventId) -> None:
        """Everything up to `event_id` is covered (by a snapshot or a replay)."""
        if self._stale:
            return  # read before the broker lost its data: covers nothing now
        if event_id.key > self._last_key:
            self._last_key = event_id.key
            self.last_id = event_id
        if self._pending is not None:
            kept = [(k, f) for k, f in self._pending if k == REPLY_KEY or k > event_id.key]
            self._pending = kept or None
            self._pending_bytes = sum(len(f) for _, f in kept)

    def go_live(self, first: list[bytes]) -> bool:
        """Send `first` (snapshot, replay), then what waited, in one write; from now on
        events are written through. If the broker lost its data while `first` was read,
        a fresh snapshot is sent instead. True when `first` was sent."""
        if self.close_reason is not None:
            return False
        self._opened = True
        if self._stale:
            self._resync_soon()
            return False
        self._release(first)
        return True

    @property
    def stale(self) -> bool:
        """The broker lost its data while the opening was read: `go_live` resyncs."""
        return self._stale

    async def send_opening_part(self, frames: list[bytes]) -> bool:
        """Write part of what the client gets first (a page of a long replay) while
        events wait, and return once the socket has drained: True when the stream goes
        on. A client that does not take it within the send timeout is cut off."""
        if self.close_reason is not None:
            return False
        if self._out.is_closing():
            self.lost()
            return False
        self._write_frames(frames)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.send_timeout_s
        while self.close_reason is None and self._backed_up():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.close(Reason.STALLED)
                break
            await self._wait_for_drain(within_s=min(remaining, DRAIN_CHECK_S))
            if self._out.is_closing():
                self.lost()
        return self.close_reason is None

    def send(self, data: bytes) -> None:
        """A command reply, in order with the events around it."""
        if self.close_reason is not None:
            return
        if self._live and self._pending is None and not self._backed_up():
            self._out.write(data)
            self.bytes_out += len(data)
        else:
            self._queue(REPLY_KEY, data)

    # --- inside ----------------------------------------------------------------------------

    def _backed_up(self) -> bool:
        """Above the socket's high-water mark: asyncio has paused writing."""
        return self._out.get_write_buffer_size() >= self._high_water

    def _queue(self, key: int, frame: bytes) -> None:
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        limits = self._limits
        if len(pending) >= limits.max_events or self._pending_bytes + len(frame) > limits.max_bytes:
            if key != REPLY_KEY and not self._opened and not self._stale:
                self._drop_waiting_events()
            else:
                self.close(Reason.OVERFLOW)
            return
        pending.append((key, frame))
        self._pending_bytes += len(frame)
        if self._live and self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_when_drained())

    def _drop_waiting_events(self) -> None:
        """The opening is still being read and written: the events that wait for it are
        in the history too, and the opening reads them from there."""
        replies = [entry for entry in self._pending or () if entry[0] == REPLY_KEY]
        self._pending = replies or None
        self._pending_bytes = sum(len(f) for _, f in replies)
        self.dropped += 1

    async def _flush_when_drained(self) -> None:
        """Write what waited, in one write, once the socket has drained; end the stream
        when it has not drained within the send timeout. Never leaves while something
        waits and the stream is open, but at a drained socket while a snapshot is read
        (events wait for it, and its end writes them or starts this again)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        try:
            while self._pending is not None and self.close_reason is None:
                if self._out.is_closing():
                    self.lost()
                    return
                if self._backed_up():
                    if deadline is None:
                        deadline = loop.time() + self._limits.send_timeout_s
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        self.close(Reason.STALLED)
                        return
                    await self._wait_for_drain(within_s=min(remaining, DRAIN_CHECK_S))
                    continue
                deadline = None
                if not self._live:
                    return  # held for a snapshot: its end writes what waits
                pending = self._pending
                self._pending, self._pending_bytes = None, 0
                self._write_frames([f for _, f in pending])
        finally:
            self._flusher = None

    async def _wait_for_drain(self, *, within_s: float) -> None:
        """Until the socket drains, or `within_s`. The protocol's drain waiter is shared by
        every write of the socket and stays cancelled once someone cancelled a wait on
        it: it is awaited through a task of its own (a timeout here cancels nothing), and
        when it ends at once without the socket having drained, a short pause follows
        instead, so that this never spins."""
        drained = asyncio.ensure_future(self._drain())
        drained.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({drained}, timeout=within_s)
        if done and self._backed_up():
            await asyncio.sleep(min(within_s, DRAIN_RETRY_S))

    def _resume(self) -> None:
        """Live again after a hold: what waited goes out now, or once the socket has
        drained (a client that does not read cannot make it pile up)."""
        self._live = True
        if self._pending is None:
            return
        if not self._backed_up():
            self._release([])
        elif self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush_when_drained())

    def _release(self, first: list[bytes]) -> None:
        frames = [*first, *(f for _, f in self._pending or ())]
        self._pending, self._pending_bytes = None, 0
        self._live = True
        self._write_frames(frames)

    def _write_frames(self, frames: list[bytes]) -> None:
        """Events (and replies among them) in one write."""
        data = b"".join(frames)
        self._out.write(data)
        self.sent += len(frames)
        self.bytes_out += len(data)

    def _resync_soon(self) -> asyncio.Task[int]:
        if self._resyncing is None:
            self._resyncing = asyncio.ensure_future(self._resync())
            self._resyncing.add_done_callback(_retrieve)
        return self._resyncing

    async def read_from_broker(self, read: Callable[[], Awaitable[T]]) -> T | None:
        """What `read` gives, asked again while the broker is unavailable (for up to
        BROKER_RETRY_S) and the client is there; None once the stream ended, closed
        with BROKER_UNAVAILABLE when the broker stayed away."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BROKER_RETRY_S
        while self.close_reason is None:
            try:
                return await read()
            except BrokerUnavailable:
                if loop.time() >= deadline:
                    self.close(Reason.BROKER_UNAVAILABLE)
                    return None
            self.check()  # a client gone meanwhile ends the retries
            await asyncio.sleep(BROKER_RETRY_PAUSE_S)
        return None

    async def _resync(self) -> int:
        while True:
            self._stale = False
            # Data is lost when Redis restarted: the first reads may meet connections of
            # the pool that it closed. The snapshot stands at least where the client
            # does (Redis may have come back from an older save): ids only go up.
            snapshot = await self.read_from_broker(
                functools.partial(
                    self._broker.snapshot, self.user_id, self.task_id, at_least=self.last_id
                )
            )
            if snapshot is None:  # what the client holds is of the lost data: it ended
                self._resyncing = None
                raise BrokerUnavailable("no fresh snapshot: the stream ended")
            if not self._stale:
                break
        self._resyncing = None
        if self.close_reason is not None:
            return 0
        self.skip_through(snapshot.position)
        message = active_tasks(
            snapshot.tasks,
            position=snapshot.position,
            recovered=False,
            truncated=snapshot.truncated,
        )
        frame = encode(message, self.transport, snapshot.position, "active_tasks")
        # Replies that waited go first (an answer computed from the lost data must not
        # follow the fresh snapshot), the new data's events after it.
        waiting = self._pending or []
        replies = [entry for entry in waiting if entry[0] == REPLY_KEY]
        events = [entry for entry in waiting if entry[0] != REPLY_KEY]
        self._pending = [*replies, (REPLY_KEY, frame), *events]
        self._release([])
        return len(frame)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
