"""The hub on its own: limits, shutdown, resume points."""

from __future__ import annotations

import pytest

from streamer.events import Delivery, EventId
from streamer.hub import CloseReason, ConnectionLimitReached, Hub, HubClosed


def delivery(user: str, ms: int) -> Delivery:
    return Delivery(user, "t", EventId("abcdef01", ms, 0), "task_progress", "{}")


def test_no_new_connections_once_shutting_down() -> None:
    hub = Hub(10, client_buffer_bytes=1 << 20, max_connections=10, max_connections_per_user=10)
    first = hub.subscribe("u")
    hub.close_all(CloseReason.SHUTDOWN)
    assert first.close_reason is CloseReason.SHUTDOWN
    with pytest.raises(HubClosed):
        hub.subscribe("u")


def test_limits_count_open_subscriptions_only() -> None:
    hub = Hub(10, client_buffer_bytes=1 << 20, max_connections=2, max_connections_per_user=1)
    a = hub.subscribe("a")
    with pytest.raises(ConnectionLimitReached):
        hub.subscribe("a")
    hub.subscribe("b")
    with pytest.raises(ConnectionLimitReached):
        hub.subscribe("c")
    hub.unsubscribe(a)
    hub.unsubscribe(a)  # twice is harmless
    assert len(hub) == 1
    hub.subscribe("c")


def test_resume_points_are_the_oldest_id_per_user() -> None:
    hub = Hub(10, client_buffer_bytes=1 << 20, max_connections=10, max_connections_per_user=10)
    old, new = hub.subscribe("u"), hub.subscribe("u")
    assert hub.resume_points() == {"u": None}  # one has nothing yet: all of it
    old.offer(delivery("u", 5))
    new.offer(delivery("u", 5))
    new.offer(delivery("u", 9))
    assert hub.resume_points() == {"u": EventId("abcdef01", 5, 0)}


async def test_a_connection_gets_each_event_once_and_in_order() -> None:
    hub = Hub(10, client_buffer_bytes=1 << 20, max_connections=10, max_connections_per_user=10)
    subscription = hub.subscribe("u")
    for ms in (5, 9, 9, 7, 12):  # a duplicate and an older one, as at a replay seam
        hub.deliver(delivery("u", ms))
    hub.deliver(delivery("someone-else", 20))
    received = []
    for _ in range(3):
        item = await subscription.next()
        assert isinstance(item, Delivery)
        received.append(item.event_id.ms)
    assert received == [5, 9, 12]
    subscription.close(CloseReason.SHUTDOWN)
    assert await subscription.next() is None  # nothing else was queued
