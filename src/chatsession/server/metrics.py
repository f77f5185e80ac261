"""Prometheus metrics of one app (its own registry: no global state).

Each worker process counts its own turns; scrape each worker, or run one
worker per port behind the balancer when you need per-worker figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    """The server's metrics.

    Attributes:
        turns: ``chatsession_turns_total{outcome}``: turns by how they ended
            (``completed``, ``error``, ``cancelled``, ``timeout``, ``busy``...).
        turn_seconds: ``chatsession_turn_seconds``: turn latency, from the
            request to the end of the turn.
        first_event_seconds: ``chatsession_turn_first_event_seconds``: from
            the request to the first event of a streamed turn.
        errors: ``chatsession_errors_total{type}``: error answers by type.
        active_streams: ``chatsession_active_streams``: streamed turns in progress.
        requests: ``chatsession_http_requests_total{method,status}``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.turns = Counter(
            "chatsession_turns", "Turns by outcome", ["outcome"], registry=self.registry
        )
        self.turn_seconds = Histogram(
            "chatsession_turn_seconds",
            "Seconds from the request to the end of the turn",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.first_event_seconds = Histogram(
            "chatsession_turn_first_event_seconds",
            "Seconds from the request to the first streamed event",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.errors = Counter(
            "chatsession_errors", "Error answers by type", ["type"], registry=self.registry
        )
        self.active_streams = Gauge(
            "chatsession_active_streams", "Streamed turns in progress", registry=self.registry
        )
        self.requests = Counter(
            "chatsession_http_requests",
            "HTTP requests by method and status",
            ["method", "status"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
