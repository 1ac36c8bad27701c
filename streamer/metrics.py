"""Prometheus metrics: of this process, or of every gunicorn worker together.

What happens per event (deliveries, latencies) is counted by the hub in plain integers;
`sync()` hands what changed since the last time to the prometheus-client metrics, so
the delivery path pays nothing for metrics. A single process syncs when /metrics is
scraped. Under gunicorn, deploy/gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR: each
worker then keeps its values in files there, syncs them every METRICS_SYNC_S, and
/metrics answers with the sum over the workers (open connections: live workers only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator, Hashable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from .broker.base import Broker
from .hub import LATENCY_BUCKETS_S, Hub

TRANSPORTS = ("websocket", "sse", "poll")
METRICS_SYNC_S = 1.0
RENDER_ATTEMPTS = 5
RENDER_RETRY_S = 0.02
log = logging.getLogger(__name__)


class _Value(Protocol):
    """What keeps one number: a counter, a histogram's bucket or sum."""

    def inc(self, amount: float) -> None: ...


def multiprocess_dir() -> str | None:
    """Where the workers' values are kept, when they are summed over processes."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self, hub: Hub, broker: Broker | None = None) -> None:
        self._hub = hub
        self._broker = broker
        self._exported: dict[Hashable, float] = {}
        self.registry = registry = CollectorRegistry()
        self.connections = Gauge(
            "streamer_connections",
            "Open client connections",
            ["transport"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.events_sent = Counter(
            "streamer_events_sent", "Events sent to clients", ["transport"], registry=registry
        )
        self.events_replayed = Counter(
            "streamer_events_replayed",
            "Events sent from the history to clients that resumed",
            registry=registry,
        )
        self.disconnects = Counter(
            "streamer_disconnects", "Streams ended, by reason", ["reason"], registry=registry
        )
        self.refusals = Counter(
            "streamer_refusals",
            "Streams refused before they started, by reason",
            ["reason"],
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "streamer_broker_reconnects",
            "Times the broker subscription was lost and opened again",
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "streamer_delivery_latency_seconds",
            "From publication to the write to this process's clients, once per event",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.events_published = Counter(
            "streamer_events_published",
            "Events published through this process",
            registry=registry,
        )
        self.undecodable_entries = Counter(
            "streamer_undecodable_entries",
            "History entries skipped because they could not be decoded",
            registry=registry,
        )
        for transport in TRANSPORTS:
            self.connections.labels(transport).set(0)
            self.events_sent.labels(transport)

    def sync(self) -> None:
        """Bring the prometheus-client values up to the hub's counts."""
        hub = self._hub
        open_counts, sent = hub.stream_counts()
        for transport in TRANSPORTS:
            self.connections.labels(transport).set(open_counts.get(transport, 0))
            self._add(self.events_sent.labels(transport), ("sent", transport), sent[transport])
        for reason, count in list(hub.ended.items()):
            self._add(self.disconnects.labels(reason.value), ("ended", reason), count)
        for reason, count in list(hub.refused.items()):
            self._add(self.refusals.labels(reason.value), ("refused", reason), count)
        self._add(self.events_replayed, "replayed", hub.replayed)
        if self._broker is not None:
            self._add(self.broker_reconnects, "reconnects", self._broker.reconnects)
        # The histogram takes the hub's bucket counts as they are (observe() would cost
        # a call per event): its per-bucket values are the non-cumulative counts.
        buckets = self.delivery_latency._buckets
        for index, count in enumerate(hub.latency_counts):
            self._add(buckets[index], ("latency", index), count)
        self._add(self.delivery_latency._sum, "latency_sum", hub.latency_sum_s)

    def _add(self, value: _Value, key: Hashable, total: float) -> None:
        delta = total - self._exported.get(key, 0)
        if delta > 0:
            value.inc(delta)
            self._exported[key] = total

    def render(self) -> bytes:
        self.sync()
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        fleet = CollectorRegistry()
        MultiProcessCollector(fleet)  # type: ignore[no-untyped-call]
        return generate_latest(fleet)

    async def render_when_readable(self) -> bytes:
        """`render()`, again a moment later when a worker's file was unreadable: a
        worker creates its file empty and then sizes it, and prometheus-client fails
        to read one caught in between (under gunicorn, while a worker starts)."""
        for _ in range(RENDER_ATTEMPTS - 1):
            try:
                return self.render()
            except (struct.error, ValueError) as exc:
                log.debug("metrics unreadable for a moment (%s); again", exc)
                await asyncio.sleep(RENDER_RETRY_S)
        return self.render()

    async def keep_synced(self) -> None:
        """Under gunicorn: sync every METRICS_SYNC_S, so that a scrape answered by one
        worker reports the others' recent counts too."""
        while True:
            await asyncio.sleep(METRICS_SYNC_S)
            self.sync()


async def metrics_ctx_for(metrics: Metrics) -> AsyncIterator[None]:
    """Keep the workers' shared values current; a last sync when the worker stops."""
    if multiprocess_dir() is None:
        yield
        return
    task = asyncio.create_task(metrics.keep_synced())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        metrics.sync()
