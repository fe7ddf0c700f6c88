"""Prometheus metrics of the OpenAI server (`GET /metrics`), in a registry of its own per server.

Requests by endpoint and HTTP status, unexpected exceptions (answered with a JSON 500) by endpoint and type,
prompt and generated tokens, time to first token, inter-token latency (the gap between two commits divided
by the tokens the later one brought), forwards and tokens per forward per mode, finish reasons, and the
queue: requests waiting for admission on the scheduler, requests waiting for their first token, and requests
generating. The KV cache: the share of its pages in use, prefix-cache queried and hit tokens, and preemptions
(read from the scheduler and its page allocator at every scrape).
"""

from __future__ import annotations

import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ...modes.sequence import tokens_per_forward

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPF_BUCKETS = (0.5, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0)


class ServerMetrics:
    """All metrics of one server; the methods are called from the engine thread and the event loop alike."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("trimode_http_requests", "HTTP requests answered, by endpoint and status",
                                     ["endpoint", "status"], registry=r)
        self.server_errors = Counter("trimode_server_errors", "Unexpected exceptions answered with a JSON 500, by "
                                     "endpoint and exception type", ["endpoint", "exception"], registry=r)
        self.requests = Counter("trimode_requests", "Generation requests submitted to the scheduler, by mode",
                                ["mode"], registry=r)
        self.finished = Counter("trimode_requests_finished", "Generation requests finished, by mode and reason",
                                ["mode", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("trimode_prompt_tokens", "Prompt tokens of submitted requests", ["mode"],
                                     registry=r)
        self.generation_tokens = Counter("trimode_generation_tokens", "Tokens committed by the engine", ["mode"],
                                         registry=r)
        self.forwards = Counter("trimode_forwards", "Forwards taken by finished requests (prefill included)",
                                ["mode"], registry=r)
        self.ttft = Histogram("trimode_time_to_first_token_seconds", "Submission to first committed token",
                              ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("trimode_inter_token_latency_seconds", "Time between committed tokens",
                             ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("trimode_request_latency_seconds", "Submission to finish", ["mode"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_forward = Histogram("trimode_tokens_per_forward", "Generated tokens per forward after the "
                                            "prefill, per finished request", ["mode"], buckets=TPF_BUCKETS,
                                            registry=r)
        self.waiting = Gauge("trimode_requests_waiting", "Requests submitted and waiting for their first token",
                             registry=r)
        self.queue = Gauge("trimode_queue_length", "Requests waiting for admission on the scheduler", registry=r)
        self.running = Gauge("trimode_requests_running", "Requests generating (first token seen, not finished)",
                             registry=r)
        self._lock = threading.Lock()

    def bind_queue(self, queue_length) -> None:
        """Read the scheduler's queue length at every scrape."""
        self.queue.set_function(lambda: float(queue_length()))

    def bind_cache(self, scheduler) -> None:
        """Read the KV cache's numbers (pages, prefix cache, preemptions) from the scheduler at every scrape."""
        self.registry.register(_CacheCollector(scheduler))

    def step(self, record) -> None:
        """Called after every scheduler step (the numbers themselves are read at scrape time)."""

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()

    def server_error(self, endpoint: str, exception: str) -> None:
        self.server_errors.labels(endpoint, exception).inc()

    def submitted(self, mode: str, prompt_tokens: int) -> None:
        self.requests.labels(mode).inc()
        self.prompt_tokens.labels(mode).inc(prompt_tokens)
        self.waiting.inc()

    def first_token(self, mode: str, seconds: float) -> None:
        self.ttft.labels(mode).observe(seconds)
        with self._lock:
            self.waiting.dec()
            self.running.inc()

    def tokens(self, mode: str, count: int, gap: float | None) -> None:
        self.generation_tokens.labels(mode).inc(count)
        if gap is not None and count > 0:
            per_token = gap / count
            for _ in range(count):
                self.itl.labels(mode).observe(per_token)

    def done(self, mode: str, started: bool, finish_reason: str, forwards: int, generated: int,
             seconds: float) -> None:
        with self._lock:
            (self.running if started else self.waiting).dec()
        self.finished.labels(mode, finish_reason).inc()
        self.e2e.labels(mode).observe(seconds)
        if forwards > 0:
            self.forwards.labels(mode).inc(forwards)
            if generated and forwards > 1:
                self.tokens_per_forward.labels(mode).observe(tokens_per_forward(generated, forwards))


class _CacheCollector:
    """KV-cache metrics straight from the scheduler and its page allocator (nothing copied between scrapes)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        pages = self.scheduler.pages
        usage = GaugeMetricFamily("trimode_kv_cache_usage_ratio", "Share of the KV cache's pages held by requests")
        usage.add_metric([], pages.in_use / pages.num_pages)
        total = GaugeMetricFamily("trimode_kv_cache_pages", "Pages of the KV cache (page size in its own metric)")
        total.add_metric([], pages.num_pages)
        size = GaugeMetricFamily("trimode_kv_cache_page_size", "Positions per KV page")
        size.add_metric([], pages.page_size)
        cached = GaugeMetricFamily("trimode_prefix_cache_pages", "Published pages no request holds (reusable)")
        cached.add_metric([], pages.cached)
        queried = CounterMetricFamily("trimode_prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        queried.add_metric([], pages.stats.queried_tokens)
        hits = CounterMetricFamily("trimode_prefix_cache_hits", "Prompt tokens found in the prefix cache")
        hits.add_metric([], pages.stats.hit_tokens)
        preempted = CounterMetricFamily("trimode_preemptions", "Requests that gave their pages back to be recomputed")
        preempted.add_metric([], self.scheduler.stats.preemptions)
        yield from (usage, total, size, cached, queried, hits, preempted)
