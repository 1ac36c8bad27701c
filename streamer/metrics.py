"""Prometheus metrics of one process (each gunicorn worker exposes its own)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "streamer_connections",
            "Open client connections",
            ["transport"],
            registry=self.registry,
        )
        self.events_published = Counter(
            "streamer_events_published",
            "Events published through this process",
            registry=self.registry,
        )
        self.events_sent = Counter(
            "streamer_events_sent",
            "Events sent to clients",
            ["transport"],
            registry=self.registry,
        )
        self.undecodable_entries = Counter(
            "streamer_undecodable_entries",
            "History entries skipped because they could not be decoded",
            registry=self.registry,
        )
        self.disconnects = Counter(
            "streamer_server_disconnects",
            "Connections ended by the server",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
