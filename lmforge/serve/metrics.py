"""Prometheus metrics of one server: engine gauges read at scrape time, latency histograms observed per request.

Each app gets its own CollectorRegistry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineCollector:
    """Reads EngineStats when Prometheus scrapes: the snapshot the engine loop took after its last step."""

    def __init__(self, stats: Callable):
        self.stats = stats

    def collect(self):
        s = self.stats()
        yield GaugeMetricFamily("lmforge_num_requests_running", "Requests in the running batch", value=s.num_running)
        yield GaugeMetricFamily("lmforge_num_requests_waiting", "Requests waiting to be scheduled", value=s.num_waiting)
        yield GaugeMetricFamily("lmforge_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", value=s.kv_usage)
        yield GaugeMetricFamily("lmforge_kv_cache_free_blocks", "Free KV cache blocks", value=s.num_free_blocks)
        yield GaugeMetricFamily("lmforge_kv_cache_total_blocks", "KV cache blocks in all", value=s.num_total_blocks)
        yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens admitted", value=s.prompt_tokens_total)
        yield CounterMetricFamily("lmforge_generation_tokens", "Tokens generated", value=s.generation_tokens_total)


class ServerMetrics:
    def __init__(self, stats: Callable):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats))
        r = self.registry
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "Time from request arrival to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds",
            "Time between two tokens of one choice",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lmforge_e2e_request_latency_seconds",
            "Time from request arrival to its last byte",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "lmforge_request_finished", "Finished choices by finish reason", ["finish_reason"], registry=r
        )
        self.http_requests = Counter(
            "lmforge_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.in_flight = Gauge("lmforge_requests_in_flight", "Generation requests the server is handling", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
