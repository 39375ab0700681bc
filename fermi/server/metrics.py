"""Prometheus metrics: request and token counters, latency histograms, per-replica load.

Names follow vLLM's (``fermi:`` prefix instead of ``vllm:``) so dashboards carry over.
Gauges of the scheduler state are read at scrape time, so the hot path never updates them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fermi.server.pool import EnginePool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)


class _PoolCollector(Collector):
    def __init__(self, pool: EnginePool, model: str) -> None:
        self.pool = pool
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["model_name", "replica", "device"]
        running = GaugeMetricFamily(
            "fermi:num_requests_running", "Requests in a KV-cache slot.", labels=labels
        )
        waiting = GaugeMetricFamily(
            "fermi:num_requests_waiting", "Requests queued for a slot.", labels=labels
        )
        load = GaugeMetricFamily(
            "fermi:replica_load", "Unfinished requests routed to the replica.", labels=labels
        )
        routed = CounterMetricFamily(
            "fermi:replica_requests", "Requests routed to the replica.", labels=labels
        )
        warming = GaugeMetricFamily(
            "fermi:warmup_in_progress",
            "1 while the replica still compiles or captures shapes in idle time.",
            labels=labels,
        )
        for r in self.pool.replicas:
            key = [self.model, str(r.index), r.device]
            stats = r.engine.stats()
            running.add_metric(key, stats.running)
            waiting.add_metric(key, stats.waiting)
            load.add_metric(key, r.load)
            routed.add_metric(key, r.requests_total)
            warming.add_metric(key, int(r.warming))
        yield from (running, waiting, load, routed, warming)


class ServerMetrics:
    def __init__(self, pool: EnginePool, model: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        reg = self.registry
        m = ["model_name"]
        self.prompt_tokens = Counter(
            "fermi:prompt_tokens", "Prompt tokens processed.", m, registry=reg
        ).labels(model)
        self.generation_tokens = Counter(
            "fermi:generation_tokens", "Tokens generated.", m, registry=reg
        ).labels(model)
        self._finished = Counter(
            "fermi:request_success",
            "Finished requests by finish reason.",
            [*m, "finished_reason"],
            registry=reg,
        )
        self.aborted = Counter(
            "fermi:requests_aborted",
            "Choices cancelled before they finished (the client left, or a choice failed).",
            m,
            registry=reg,
        ).labels(model)
        self._errors = Counter(
            "fermi:http_errors", "Error responses by status.", [*m, "status"], registry=reg
        )
        self.ttft = Histogram(
            "fermi:time_to_first_token_seconds",
            "Seconds from request arrival to the first generated token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(model)
        self.itl = Histogram(
            "fermi:inter_token_latency_seconds",
            "Seconds between two deltas of one stream.",
            m,
            buckets=_TOKEN_BUCKETS,
            registry=reg,
        ).labels(model)
        self.e2e = Histogram(
            "fermi:e2e_request_latency_seconds",
            "Seconds from request arrival to its last token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        ).labels(model)
        reg.register(_PoolCollector(pool, model))

    def finished(self, reason: str) -> None:
        self._finished.labels(self.model, reason).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
