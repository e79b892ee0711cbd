"""``GET /metrics``: Prometheus metrics of one server (its own registry, so two apps in one process never mix).

Names: ``codeaccel_*`` for our own; the speculative counters also as vLLM names them
(``vllm:spec_decode_num_drafts``, ``…_num_draft_tokens``, ``…_num_accepted_tokens``,
``…_num_accepted_tokens_per_pos{position}``) and as llama-server does
(``llamacpp:spec_decode_num_drafts``, ...), and llama-server's own prompt and predicted token counters and
processing / deferred gauges (``llamacpp:prompt_tokens``, ``llamacpp:requests_processing``, ...), so existing
dashboards read them unchanged.
prometheus-client adds ``_total`` to every counter's exposed name, as both of them expose.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from codeaccel.decoding.generation import Generation

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
MAX_DRAFT_POSITIONS = 16  # positions of the per-position acceptance counter


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "codeaccel_request_latency_seconds", "Submission to last token, per choice", buckets=LATENCY_BUCKETS_S,
            registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "codeaccel_time_to_first_token_seconds", "Submission to first token, per choice",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("codeaccel_prompt_tokens", "Prompt tokens of finished choices", registry=r)
        self.prompt_tokens_cached = Counter(
            "codeaccel_prompt_tokens_cached", "Prompt tokens a kept sequence's cache held (not evaluated)", registry=r
        )
        # vLLM's prefix-cache counters (in tokens: queried = prompt tokens looked up, hits = found cached)
        self.prefix_cache_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up", registry=r)
        self.prefix_cache_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found cached", registry=r)
        self.generation_tokens = Counter("codeaccel_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("codeaccel_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.cancelled = Counter("codeaccel_cancelled", "Choices stopped because the client went away", registry=r)
        self.queue_length = Gauge("codeaccel_queue_length", "Choices waiting for a sequence", registry=r)
        self.running = Gauge("codeaccel_running", "Sequences decoding in the last step", registry=r)
        self.batch_occupancy = Gauge(
            "codeaccel_batch_occupancy", "Sequences in the last decode step / sequences available", registry=r
        )
        self.decode_steps = Counter("codeaccel_decode_steps", "Batched decode evaluations", registry=r)
        self.engine_seconds = Counter("codeaccel_engine_seconds", "Seconds the target spent evaluating (decode and "
                                      "prompt tokens, drafts verified)", registry=r)  # fmt: skip
        self.draft_swaps = Counter("codeaccel_draft_swaps", "Tuned draft versions swapped in (or back out)", registry=r)
        # llama-server's own names, for dashboards built on it (it counts evaluated prompt tokens, as here)
        self.llama_prompt_tokens = Counter("llamacpp:prompt_tokens", "Prompt tokens evaluated", registry=r)
        self.llama_tokens_predicted = Counter("llamacpp:tokens_predicted", "Generated tokens", registry=r)
        self.llama_processing = Gauge("llamacpp:requests_processing", "Requests decoding", registry=r)
        self.llama_deferred = Gauge("llamacpp:requests_deferred", "Requests waiting for a slot", registry=r)
        self.spec = {}
        for prefix in ("vllm:", "llamacpp:"):
            self.spec[prefix] = (
                Counter(f"{prefix}spec_decode_num_drafts", "Drafts verified", registry=r),
                Counter(f"{prefix}spec_decode_num_draft_tokens", "Draft tokens verified", registry=r),
                Counter(f"{prefix}spec_decode_num_accepted_tokens", "Draft tokens accepted", registry=r),
                Counter(
                    f"{prefix}spec_decode_num_accepted_tokens_per_pos",
                    "Draft tokens accepted at each position",
                    ["position"],
                    registry=r,
                ),  # fmt: skip
            )
        self.spec_positions = {}
        for prefix, (*_, per_pos) in self.spec.items():
            for i in range(MAX_DRAFT_POSITIONS):  # exposed from the start, as vLLM does
                self.spec_positions[prefix, i] = per_pos.labels(position=str(i))

    def watch_completion_cache(self, cache) -> None:
        """Export a completion cache's hit and miss counts (read from it at every scrape)."""
        self.registry.register(_CacheCollector(cache))

    def observe_step(self, batch: int, n_seq_max: int, waiting: int) -> None:
        self.decode_steps.inc()
        self.running.set(batch)
        self.batch_occupancy.set(batch / n_seq_max)
        self.queue_length.set(waiting)
        self.llama_processing.set(batch)
        self.llama_deferred.set(waiting)

    def observe_idle(self) -> None:
        """Nothing running or waiting: the gauges say so (they are set after every step otherwise)."""
        self.running.set(0)
        self.batch_occupancy.set(0)
        self.queue_length.set(0)
        self.llama_processing.set(0)
        self.llama_deferred.set(0)

    def observe_finished(self, generation: Generation, latency_s: float, counts_prompt: bool = True) -> None:
        """A finished choice; its prompt's tokens only for the first choice of a prompt (n > 1 shares it)."""
        self.request_latency.observe(latency_s)
        if counts_prompt:
            self.prompt_tokens.inc(generation.n_prompt_tokens)
            self.llama_prompt_tokens.inc(generation.n_prompt_tokens - generation.n_cached_prompt_tokens)
            self.prompt_tokens_cached.inc(generation.n_cached_prompt_tokens)
            self.prefix_cache_queries.inc(generation.n_prompt_tokens)
            self.prefix_cache_hits.inc(generation.n_cached_prompt_tokens)
        self.generation_tokens.inc(generation.n_generated)
        self.llama_tokens_predicted.inc(generation.n_generated)
        spec = generation.stats.speculation if generation.stats is not None else None
        if spec is None:
            return
        for prefix, (drafts, drafted, accepted, _) in self.spec.items():
            drafts.inc(spec.drafts)
            drafted.inc(spec.drafted_tokens)
            accepted.inc(spec.accepted_tokens)
            for i, n in enumerate(spec.accepted_at[:MAX_DRAFT_POSITIONS]):
                self.spec_positions[prefix, i].inc(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    """The completion cache's counters as Prometheus counters (the cache counts; a scrape reads)."""

    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        yield CounterMetricFamily("codeaccel_completion_cache_hits", "Requests answered from the completion cache",
                                  value=self.cache.hits)  # fmt: skip
        yield CounterMetricFamily("codeaccel_completion_cache_misses", "Reproducible requests not in the cache",
                                  value=self.cache.misses)  # fmt: skip
