"""The engine's Prometheus metrics, under FastDeploy's names, in a per-app registry.

Gauges are unlabelled so lines such as ``fastdeploy:num_requests_running 3`` appear as routers
expect when they scrape with a regex. Gauges over live state read it at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class EngineMetrics:
    """Every metric one engine exports; the engine loop and the API layer report into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"fastdeploy:{name}", doc, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"fastdeploy:{name}", doc, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"fastdeploy:{name}", doc, buckets=buckets, registry=r)

        self.num_requests_running = gauge("num_requests_running", "Sequences in the batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests queued or preempted")
        self.available_gpu_block_num = gauge(
            "available_gpu_block_num", "KV blocks an allocation can take (free + evictable)"
        )
        self.free_gpu_block_num = gauge("free_gpu_block_num", "KV blocks holding nothing")
        self.max_gpu_block_num = gauge("max_gpu_block_num", "KV blocks in the cache")
        self.gpu_cache_usage_perc = gauge("gpu_cache_usage_perc", "Share of KV blocks in use")
        self.batch_size = gauge("batch_size", "Sequences in the last step")
        self.max_batch_size = gauge("max_batch_size", "--max-num-seqs")
        self.available_batch_size = gauge("available_batch_size", "Free batch slots")
        self.hit_req_rate = gauge("hit_req_rate", "Share of requests with a prefix-cache hit")
        self.hit_token_rate = gauge("hit_token_rate", "Share of prompt tokens from the cache")
        self.prefix_cache_hit_rate = gauge(
            "prefix_cache_hit_rate", "Share of prompt tokens served by the prefix cache"
        )
        self.requests_number = counter("requests_number", "Requests received")
        self.request_success = counter("request_success", "Requests finished without error")
        self.request_preempted = counter(
            "request_preempted", "Sequences preempted for lack of blocks (recomputed later)"
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens admitted")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found cached")
        self.prefix_cache_token_num = counter(
            "prefix_cache_token_num", "Prompt tokens found cached (FastDeploy's name)"
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Arrival to first token", _LATENCY_BUCKETS
        )
        self.time_per_output_token = histogram(
            "time_per_output_token_seconds", "Mean gap between output tokens", _LATENCY_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Arrival to last token", _LATENCY_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS
        )
        self._admitted = 0
        self._hit_requests = 0
        self._queried_tokens = 0
        self._hit_tokens = 0

    def bind(
        self,
        running: Callable[[], float],
        available_blocks: Callable[[], float],
        free_blocks: Callable[[], float],
        used_blocks: Callable[[], float],
        total_blocks: int,
        max_num_seqs: int,
    ) -> None:
        """Read the live gauges from the engine's state at scrape time."""
        self.num_requests_running.set_function(running)
        self.available_gpu_block_num.set_function(available_blocks)
        self.free_gpu_block_num.set_function(free_blocks)
        self.max_gpu_block_num.set(total_blocks)
        self.gpu_cache_usage_perc.set_function(lambda: used_blocks() / total_blocks)
        self.max_batch_size.set(max_num_seqs)
        self.available_batch_size.set_function(lambda: max_num_seqs - running())

    def on_admit(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request was admitted for the first time with ``cached_tokens`` from the cache."""
        self.prompt_tokens.inc(prompt_tokens)
        self.prefix_cache_queries.inc(prompt_tokens)
        self.prefix_cache_hits.inc(cached_tokens)
        self.prefix_cache_token_num.inc(cached_tokens)
        self._admitted += 1
        self._hit_requests += cached_tokens > 0
        self._queried_tokens += prompt_tokens
        self._hit_tokens += cached_tokens
        self.hit_req_rate.set(self._hit_requests / self._admitted)
        rate = self._hit_tokens / self._queried_tokens if self._queried_tokens else 0.0
        self.hit_token_rate.set(rate)
        self.prefix_cache_hit_rate.set(rate)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
