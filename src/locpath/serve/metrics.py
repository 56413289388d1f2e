"""Prometheus metrics of one service (prometheus-client, in a registry of its own): queue depths, jobs by state,
tiles/s of ingestion, time to first token and answer latency, questions decoded together, slide-cache hits."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _JobStates:
    """Jobs by kind and state, read from the database at scrape time (so it survives restarts)."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        g = GaugeMetricFamily("locpath_jobs", "jobs by kind and state", labels=["kind", "state"])
        for (kind, state), n in sorted(self.store.job_counts().items()):
            g.add_metric([kind, state], n)
        yield g


class Metrics:
    def __init__(self, store):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("locpath_queue_depth", "tasks waiting per worker lane", ["lane"], registry=r)
        self.tiles = Counter("locpath_tiles_encoded", "tiles read and encoded", registry=r)
        self.tiles_per_s = Gauge("locpath_ingest_tiles_per_second", "tiles/s of the last ingestion", registry=r)
        self.ttft = Histogram("locpath_time_to_first_token_seconds", "question received to first answer text",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.answer = Histogram("locpath_answer_seconds", "question received to whole answer",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.cache = Counter("locpath_slide_cache_lookups", "slide preparations by where the latents came from",
                             ["result"], registry=r)
        self.decode_batch = Gauge("locpath_decode_batch_rows", "questions being decoded together now", registry=r)
        self.rejected = Counter("locpath_rejected", "requests refused for a full queue", ["lane"], registry=r)
        self.requests = Counter("locpath_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        r.register(_JobStates(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)
