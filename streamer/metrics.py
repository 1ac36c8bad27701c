"""Prometheus metrics of one process (each gunicorn worker exposes its own).

What happens per event (deliveries) is counted by the hub in plain integers and read
when /metrics is scraped, so the delivery path pays nothing for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .hub import Hub

TRANSPORTS = ("websocket", "sse", "poll")


class Metrics:
    def __init__(self, hub: Hub) -> None:
        self.registry = CollectorRegistry()
        self.events_published = Counter(
            "streamer_events_published",
            "Events published through this process",
            registry=self.registry,
        )
        self.undecodable_entries = Counter(
            "streamer_undecodable_entries",
            "History entries skipped because they could not be decoded",
            registry=self.registry,
        )
        self.registry.register(_HubCollector(hub))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HubCollector(Collector):
    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        connections = GaugeMetricFamily(
            "streamer_connections", "Open client connections", labels=["transport"]
        )
        sent = CounterMetricFamily(
            "streamer_events_sent", "Events sent to clients", labels=["transport"]
        )
        for transport in TRANSPORTS:
            connections.add_metric([transport], hub.open_count(transport))
            sent.add_metric([transport], hub.sent(transport))
        ended = CounterMetricFamily(
            "streamer_disconnects", "Streams ended, by reason", labels=["reason"]
        )
        for reason, count in hub.ended.items():
            ended.add_metric([reason.value], count)
        refused = CounterMetricFamily(
            "streamer_refusals", "Streams refused before they started, by reason", labels=["reason"]
        )
        for reason, count in hub.refused.items():
            refused.add_metric([reason.value], count)
        yield from (connections, sent, ended, refused)
