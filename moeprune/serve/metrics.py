"""The server's Prometheus metrics (prometheus_client, one registry per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters of requests, tokens, switches and expert reads; latency and batch-size histograms."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("moeprune_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("moeprune_prompt_tokens", "prompt tokens of answered requests", registry=r)
        self.generation_tokens = Counter("moeprune_generation_tokens", "tokens generated", registry=r)
        self.switches = Counter("moeprune_switches", "pattern switches (experts changed)", registry=r)
        self.expert_bytes = Counter("moeprune_expert_bytes_read", "bytes of experts read from the checkpoint",
                                    registry=r)
        self.experts_read = Counter("moeprune_experts_read", "experts read from the checkpoint", registry=r)
        self.prefetched = Counter("moeprune_expert_bytes_prefetched", "expert bytes read ahead into the page cache",
                                  registry=r)
        self.cache_hits = Counter("moeprune_expert_cache_hits", "experts a switch took from the cache", registry=r)
        self.latency = Histogram("moeprune_request_latency_seconds", "time from request to last token",
                                 ["endpoint"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.switch_seconds = Histogram("moeprune_switch_seconds", "time of a pattern switch", registry=r,
                                        buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60))
        self.batch_size = Histogram("moeprune_batch_size", "requests per generation batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queued = Gauge("moeprune_queued_requests", "requests waiting for a batch", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
