"""The per-process hub: live connections by user, the broker routing kept to the users
that have one here, and in-memory fan-out to them."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import heapq
import itertools
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

from . import logs
from .connection import Connection, Limits
from .reasons import BROKER_UNAVAILABLE_MESSAGE, SHUTTING_DOWN_MESSAGE, Reason, Refused
from .wire import Delivery, EventId, Transport

# How often every stream is looked at for a client that left. Under streamer's gunicorn
# worker the handler of a stream that reads nothing from its client (SSE, long polls) is
# cancelled at once; aiohttp's own worker does not, and such a stream would otherwise
# count against its user's limit until its next write (a long poll's: its answer).
GONE_CHECK_S = 1.0

# Upper bounds (seconds) of the publish-to-delivery latency histogram's buckets.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _User:
    """A user's connections here, and their subscription at the broker: `routed` is
    the subscribing task until it succeeded, then None (not kept for the length of
    the user's streams)."""

    __slots__ = ("connections", "routed", "seen")

    def __init__(self, routed: asyncio.Future[None]) -> None:
        self.connections: set[Connection] = set()
        self.routed: asyncio.Future[None] | None = routed
        self.seen: EventId | None = None  # the newest event handed to them here


class Hub:
    def __init__(
        self,
        *,
        subscribe: Callable[[str], Awaitable[None]],
        unsubscribe: Callable[[str], None],
        max_connections: int,
        max_connections_per_user: int,
        limits: Limits,
    ) -> None:
        self.limits = limits  # what each connection may cost; one object for all
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._max_connections = max_connections
        self._max_per_user = max_connections_per_user
        self._users: dict[str, _User] = {}
        self._count = 0
        self._closed = False
        self._opening_deadlines: set[asyncio.Timeout] = set()
        self._started: list[Connection] = []  # connections with events to write this turn
        self._write_scheduled = False
        # (expires_at, sequence, connection): the next credentials to end, first.
        # Weak: a connection that ended is freed at once, not when its entry leaves.
        self._expiries: list[tuple[float, int, weakref.ref[Connection]]] = []
        self._expiry_sequence = itertools.count()
        self._ended_in_expiries = 0
        # Counted here rather than per event: what the metrics read when scraped.
        self.ended: collections.Counter[Reason] = collections.Counter()
        self.refused: collections.Counter[Reason] = collections.Counter()
        self.sent_by_ended: collections.Counter[str] = collections.Counter()
        self.replayed = 0  # events sent from the history to clients that resumed
        # Publish-to-delivery latency, once per event that reached this process's
        # clients: counts per bucket of LATENCY_BUCKETS_S (the last one: above them all).
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self._arrived: list[int] = []  # publish times (ms) of this turn's events

    async def attach(self, connection: Connection) -> None:
        """Count the connection in and wait until its user's events flow to this process.

        Raises Refused when the process is shutting down, a limit is reached or the
        broker cannot route the user's events here.
        """
        self.check_admissible(connection.user_id)
        user_id = connection.user_id
        user = self._users.get(user_id)
        if user is None:
            subscribing = asyncio.ensure_future(self._subscribe(user_id))
            subscribing.add_done_callback(_retrieve)
            user = _User(subscribing)
            self._users[user_id] = user
        user.connections.add(connection)
        self._count += 1
        if connection.expires_at is not None:
            entry = (connection.expires_at, next(self._expiry_sequence), weakref.ref(connection))
            heapq.heappush(self._expiries, entry)
        routed = user.routed
        if routed is None:
            return
        try:
            await asyncio.shield(routed)
        except asyncio.CancelledError:  # the client went away meanwhile
            self.detach(connection, None)
            raise
        except Exception:
            self.detach(connection, None)
            self.refused[Reason.BROKER_UNAVAILABLE] += 1
            raise Refused(Reason.BROKER_UNAVAILABLE, BROKER_UNAVAILABLE_MESSAGE) from None
        if user.routed is routed:
            user.routed = None

    def check_admissible(self, user_id: str) -> None:
        """Raises Refused (and counts it) when a stream of `user_id` would not be counted
        in now: the process is shutting down, or a limit is reached."""
        try:
            self._check_limits(user_id)
        except Refused as refusal:
            self.refused[refusal.reason] += 1
            raise

    def _check_limits(self, user_id: str) -> None:
        if self._closed:
            raise Refused(Reason.SHUTTING_DOWN, SHUTTING_DOWN_MESSAGE)
        if self._count >= self._max_connections:
            raise Refused(
                Reason.TOO_MANY_CONNECTIONS, "this server has too many connections; retry later"
            )
        user = self._users.get(user_id)
        if user is not None and len(user.connections) >= self._max_per_user:
            raise Refused(
                Reason.TOO_MANY_CONNECTIONS,
                f"too many connections for this user (at most {self._max_per_user})",
            )

    def detach(self, connection: Connection, reason: Reason | None) -> None:
        """The connection is over (`reason`: why, when it ended after it started)."""
        user = self._users.get(connection.user_id)
        if user is None or connection not in user.connections:
            return
        user.connections.discard(connection)
        self._count -= 1
        connection.discard()
        if connection.expires_at is not None:
            self._forget_expiry()
        if reason is not None:
            self.ended[reason] += 1
            self.sent_by_ended[connection.transport] += connection.sent
            logs.stream_ended(
                user_id=connection.user_id,
                transport=connection.transport,
                duration_s=time.monotonic() - connection.opened_at,
                events_sent=connection.sent,
                reason=reason.value,
            )
        if not user.connections:
            del self._users[connection.user_id]
            if user.routed is not None:
                user.routed.cancel()  # nobody waits for it any more
            # Also when the subscription failed: Redis may still confirm it later.
            self._unsubscribe(connection.user_id)

    def _forget_expiry(self) -> None:
        """Entries of connections that ended stay in the heap (closing them is a no-op)
        until they are half of it; then it is rebuilt: amortised O(1) per connection."""
        self._ended_in_expiries += 1
        if self._ended_in_expiries > max(1000, len(self._expiries) // 2):
            self._expiries = [e for e in self._expiries if _open(e[2]())]
            heapq.heapify(self._expiries)
            self._ended_in_expiries = 0

    def deliver(self, delivery: Delivery) -> None:
        """Hand an event to its user's connections. They write at the end of this turn
        of the event loop: events delivered in one turn leave in one write per
        connection, a lone event as soon as it came."""
        self._offer(delivery)
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_batches)

    def deliver_all(self, deliveries: Sequence[Delivery]) -> None:
        """Events that arrived together (read from Redis at once): written now, in one
        write per connection, with whatever else this turn delivered. Each user's events
        are joined once per transport, and a connection that takes every event as it
        comes gets them in one call (`write_through`); the others sort them one by one."""
        if len(deliveries) == 1:
            self._offer_group(deliveries[0].user_id, deliveries)
        else:
            by_user: dict[str, list[Delivery]] = {}
            for delivery in deliveries:
                group = by_user.get(delivery.user_id)
                if group is None:
                    by_user[delivery.user_id] = [delivery]
                else:
                    group.append(delivery)
            for user_id, group in by_user.items():
                self._offer_group(user_id, group)
        self._write_batches()

    def _offer_group(self, user_id: str, group: Sequence[Delivery]) -> None:
        """A user's events of one read, in publish order."""
        user = self._users.get(user_id)
        if user is None:
            return
        last = group[-1].event_id
        user.seen = last
        arrived = self._arrived
        for delivery in group:
            arrived.append(delivery.event_id.ms)
        first_key, count = group[0].event_id.key, len(group)
        if count > 1 and not _increasing(group):
            first_key = -1  # a duplicate or one out of order: `offer` drops it
        frames: dict[Transport, bytes] = {}
        started = self._started
        for connection in user.connections:
            transport = connection.transport
            frame = frames.get(transport)
            if frame is None:
                frame = frames[transport] = _joined(group, transport)
            if first_key < 0 or not connection.write_through(first_key, last, count, frame):
                for delivery in group:
                    if connection.offer(delivery):
                        started.append(connection)

    def _offer(self, delivery: Delivery) -> None:
        user = self._users.get(delivery.user_id)
        if user is None:
            return
        user.seen = delivery.event_id
        self._arrived.append(delivery.event_id.ms)
        started = self._started
        for connection in user.connections:
            if connection.offer(delivery):
                started.append(connection)

    def _write_batches(self) -> None:
        started, self._started = self._started, []
        self._write_scheduled = False
        for connection in started:
            connection.write_batch()
        arrived, self._arrived = self._arrived, []
        # An event id's ms part is its publish time (Redis's clock, or this process's
        # for the embedded broker): one look at the clock for the whole turn.
        now_ms = time.time() * 1000
        counts, bounds = self.latency_counts, LATENCY_BUCKETS_S
        total = 0.0
        for published_ms in arrived:
            latency = max(now_ms - published_ms, 0.0) / 1000
            counts[bisect.bisect_left(bounds, latency)] += 1
            total += latency
        self.latency_sum_s += total

    def resume_points(self) -> dict[str, EventId | None]:
        """Where each user's catch-up starts: after the last event handed to the user here.

        Each of their connections was handed every event up to it: it holds them, or
        queued them, or dropped them as another task's (under a task filter, whose
        position lags behind), or, still opening, reads them from the history itself or
        has them in a snapshot read after the subscription was confirmed. Only when
        none came since the subscription (or since their data was lost), the oldest
        position among their connections: all of the history if one has none. Users
        whose subscription is not confirmed yet need nothing: their snapshots are read
        after it.
        """
        points: dict[str, EventId | None] = {}
        for user_id, user in self._users.items():
            if user.routed is not None and not user.routed.done():
                continue
            if user.seen is not None:
                points[user_id] = user.seen
                continue
            last_ids = [c.last_id for c in user.connections]
            points[user_id] = None if None in last_ids else min(i for i in last_ids if i)
        return points

    def users(self) -> list[str]:
        return list(self._users)

    def reset(self, user_id: str | None = None) -> None:
        """The broker lost its data (only `user_id`'s, if given): those clients start
        again from a snapshot."""
        if user_id is None:
            users = list(self._users.values())
        else:
            user = self._users.get(user_id)
            users = [] if user is None else [user]
        for user in users:
            user.seen = None  # an id of the lost data
            for connection in list(user.connections):
                connection.resync()

    async def keep_time(self, *, heartbeat_s: float, ping_s: float) -> None:
        """One task for every connection's clock: credentials that expire end their
        streams, SSE streams get a heartbeat comment every heartbeat_s, and WebSocket
        clients a ping every ping_s (one that did not answer the previous one is dropped).
        No timer per connection; each round is spread over its interval, a slice of the
        connections per tick, so that no tick writes to all of them at once."""
        loop = asyncio.get_running_loop()
        tick = min(0.1, heartbeat_s, ping_s)
        heartbeats = _Round(heartbeat_s, tick, self.heartbeat, start=loop.time())
        pings = _Round(ping_s, tick, self.ping, start=loop.time())
        gone = _Round(GONE_CHECK_S, tick, self.notice_gone, start=loop.time())
        while True:
            await asyncio.sleep(tick)
            self.expire(time.time())
            now = loop.time()
            heartbeats.advance(now, self.connections)
            pings.advance(now, self.connections)
            gone.advance(now, self.connections)

    def expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, _, ref = heapq.heappop(expiries)
            if (connection := ref()) is not None:
                connection.close(Reason.EXPIRED)

    @staticmethod
    def heartbeat(connections: Iterable[Connection]) -> None:
        """A heartbeat on SSE streams: proxies and clients see they are alive."""
        for connection in connections:
            if connection.transport == "sse":
                connection.write_idle(connection.heartbeat)

    @staticmethod
    def notice_gone(connections: Iterable[Connection]) -> None:
        """End the streams whose client went away quietly."""
        for connection in connections:
            connection.check()

    @staticmethod
    def ping(connections: Iterable[Connection]) -> None:
        """Ping WebSocket clients; drop those that did not answer their last ping (but
        not while a command of theirs waits for the broker: the answer waits unread)."""
        for connection in connections:
            if connection.transport != "websocket":
                continue
            if not connection.heard and not connection.answering:
                connection.close(Reason.UNRESPONSIVE)
                continue
            connection.heard = False
            if not connection.write_idle(connection.heartbeat):
                connection.heard = True  # busy writing: its own deadline applies

    def connections(self) -> Iterator[Connection]:
        for user in self._users.values():
            yield from user.connections

    @property
    def shutting_down(self) -> bool:
        return self._closed

    @contextlib.contextmanager
    def opening(self, deadline: asyncio.Timeout) -> Iterator[None]:
        """While a stream opens under `deadline`: at shutdown the deadline comes at once,
        rather than the stream waiting (for a stalled broker, say) to be refused later."""
        self._opening_deadlines.add(deadline)
        try:
            yield
        finally:
            self._opening_deadlines.discard(deadline)

    def close_all(self, reason: Reason) -> None:
        """End every connection; with SHUTDOWN, refuse new ones from now on and cut the
        openings under way short."""
        if reason is Reason.SHUTDOWN:
            self._closed = True
            now = asyncio.get_running_loop().time()
            for deadline in self._opening_deadlines:
                if not deadline.expired():
                    deadline.reschedule(now)
        for connection in list(self.connections()):
            connection.close(reason)

    def sent(self, transport: str) -> int:
        """Events written to clients of a transport, ended connections included."""
        live = sum(c.sent for c in self.connections() if c.transport == transport)
        return self.sent_by_ended[transport] + live

    def open_count(self, transport: str) -> int:
        return sum(1 for c in self.connections() if c.transport == transport)

    def stream_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Open connections and events sent (ended connections included), by
        transport, in one pass."""
        open_counts: dict[str, int] = collections.Counter()
        sent: dict[str, int] = collections.Counter(self.sent_by_ended)
        for connection in self.connections():
            open_counts[connection.transport] += 1
            sent[connection.transport] += connection.sent
        return open_counts, sent

    def __len__(self) -> int:
        return self._count


def _open(connection: Connection | None) -> bool:
    return connection is not None and connection.close_reason is None


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a failed subscription's exception as seen: the connections report it."""
    if not future.cancelled():
        future.exception()


class _Round:
    """Visit every connection once per `interval`, a slice per tick. A round holds its
    connections weakly: one that ended is not kept until its turn (up to a ping
    interval, for every client that came and went meanwhile)."""

    def __init__(
        self,
        interval: float,
        tick: float,
        visit: Callable[[Iterable[Connection]], None],
        *,
        start: float,
    ) -> None:
        self._interval = interval
        self._tick = tick
        self._visit = visit
        self._queue: collections.deque[weakref.ref[Connection]] = collections.deque()
        self._per_tick = 0
        self._started = start  # the first round begins one interval from now

    def advance(self, now: float, connections: Callable[[], Iterable[Connection]]) -> None:
        if not self._queue and now - self._started >= self._interval:
            self._queue = collections.deque(map(weakref.ref, connections()))
            self._started = now
            self._per_tick = math.ceil(len(self._queue) * self._tick / self._interval)
        count = min(self._per_tick, len(self._queue))
        batch = [self._queue.popleft()() for _ in range(count)]
        # Those that ended are skipped.
        self._visit(c for c in batch if c is not None and c.close_reason is None)


def _joined(group: Sequence[Delivery], transport: Transport) -> bytes:
    if len(group) == 1:
        return group[0].frame(transport)
    return b"".join([delivery.frame(transport) for delivery in group])


def _increasing(group: Sequence[Delivery]) -> bool:
    keys = (delivery.event_id.key for delivery in group)
    return all(earlier < later for earlier, later in itertools.pairwise(keys))
