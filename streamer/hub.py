"""The per-process hub: live connections by user, and in-memory fan-out to them."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from collections.abc import Iterator

from .events import Delivery, EventId


class CloseReason(enum.Enum):
    """Why the server ends a connection; transports map each to their own signal."""

    OVERFLOW = "overflow"  # the client did not keep up with its buffer
    STALLED = "stalled"  # a write waited longer than the send timeout
    SHUTDOWN = "shutdown"  # the process is stopping or reloading
    EXPIRED = "expired"  # the access token expired


class Resync:
    """In a subscription's buffer: send a fresh snapshot with `recovered: false` here."""


RESYNC = Resync()


class Subscription:
    """One connection's bounded buffer of events to send, in publish order."""

    def __init__(self, user_id: str, task_id: str | None, limit: int, limit_bytes: int) -> None:
        self.user_id = user_id
        self.task_id = task_id
        self._limit = limit
        self._limit_bytes = limit_bytes
        self._buffered_bytes = 0
        self._buffer: deque[Delivery | Resync] = deque()
        self._wakeup = asyncio.Event()
        self._last_id: EventId | None = None
        self.close_reason: CloseReason | None = None

    @property
    def last_id(self) -> EventId | None:
        """The newest event this connection has been sent or has queued."""
        return self._last_id

    def wants(self, delivery: Delivery) -> bool:
        return self.task_id is None or delivery.task_id == self.task_id

    def offer(self, delivery: Delivery) -> None:
        """Queue an event unless already sent or queued (replay/live seam)."""
        if self.close_reason is not None or not self.wants(delivery):
            return
        if self._last_id is not None and delivery.event_id <= self._last_id:
            return
        size = len(delivery.json)
        if len(self._buffer) >= self._limit or self._buffered_bytes + size > self._limit_bytes:
            self.close(CloseReason.OVERFLOW)
            return
        self._last_id = delivery.event_id
        self._buffer.append(delivery)
        self._buffered_bytes += size
        self._wakeup.set()

    def skip_through(self, event_id: EventId) -> None:
        """Drop queued events up to `event_id`: they were already sent by a replay."""
        if self._last_id is None or event_id > self._last_id:
            self._last_id = event_id
        self._buffer = deque(
            item for item in self._buffer if isinstance(item, Resync) or item.event_id > event_id
        )
        self._buffered_bytes = sum(
            len(item.json) for item in self._buffer if not isinstance(item, Resync)
        )

    def resync(self) -> None:
        """The broker lost its data: the client must start again from a snapshot."""
        if self.close_reason is None and not (self._buffer and self._buffer[-1] is RESYNC):
            self._buffer.append(RESYNC)
            self._wakeup.set()

    def close(self, reason: CloseReason) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self._buffer.clear()
            self._buffered_bytes = 0
            self._wakeup.set()

    async def next(self) -> Delivery | Resync | None:
        """The next event (or resync point) to send; None once the subscription is closed."""
        while True:
            if self.close_reason is not None:
                return None
            if self._buffer:
                item = self._buffer.popleft()
                if not isinstance(item, Resync):
                    self._buffered_bytes -= len(item.json)
                return item
            self._wakeup.clear()
            await self._wakeup.wait()

    async def wait_closed(self) -> CloseReason:
        while self.close_reason is None:
            self._wakeup.clear()
            await self._wakeup.wait()
        return self.close_reason


class ConnectionLimitReached(Exception):
    """Refused: the process or the user already has as many streams as allowed."""


class HubClosed(Exception):
    """Refused: the process is shutting down."""


class Hub:
    def __init__(
        self,
        client_buffer: int,
        *,
        client_buffer_bytes: int,
        max_connections: int,
        max_connections_per_user: int,
    ) -> None:
        self._client_buffer = client_buffer
        self._client_buffer_bytes = client_buffer_bytes
        self._max_connections = max_connections
        self._max_per_user = max_connections_per_user
        self._by_user: dict[str, set[Subscription]] = {}
        self._count = 0
        self._closed = False

    def subscribe(self, user_id: str, task_id: str | None = None) -> Subscription:
        if self._closed:
            raise HubClosed("the server is shutting down; reconnect")
        if self._count >= self._max_connections:
            raise ConnectionLimitReached("this server has too many connections; retry later")
        if len(self._by_user.get(user_id, ())) >= self._max_per_user:
            raise ConnectionLimitReached(
                f"too many connections for this user (at most {self._max_per_user})"
            )
        self._count += 1
        subscription = Subscription(
            user_id, task_id, self._client_buffer, self._client_buffer_bytes
        )
        self._by_user.setdefault(user_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._by_user.get(subscription.user_id)
        if subscriptions is None or subscription not in subscriptions:
            return
        self._count -= 1
        subscriptions.discard(subscription)
        if not subscriptions:
            del self._by_user[subscription.user_id]

    def deliver(self, delivery: Delivery) -> None:
        for subscription in tuple(self._by_user.get(delivery.user_id, ())):
            subscription.offer(delivery)

    def resume_points(self) -> dict[str, EventId | None]:
        points: dict[str, EventId | None] = {}
        for user_id, subscriptions in self._by_user.items():
            last_ids = [s.last_id for s in subscriptions]
            points[user_id] = None if None in last_ids else min(i for i in last_ids if i)
        return points

    def reset(self) -> None:
        for subscription in list(self.subscriptions()):
            subscription.resync()

    def subscriptions(self) -> Iterator[Subscription]:
        for subscriptions in self._by_user.values():
            yield from subscriptions

    def close_all(self, reason: CloseReason) -> None:
        """End every connection; with SHUTDOWN, refuse new ones from now on."""
        if reason is CloseReason.SHUTDOWN:
            self._closed = True
        for subscription in list(self.subscriptions()):
            subscription.close(reason)

    def __len__(self) -> int:
        return self._count
