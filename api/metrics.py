"""Prometheus metrics, named as vLLM names them (with a ``medvl_`` prefix), so a serving
engineer's dashboards read them: running and waiting requests, KV-cache usage, time to first
token and inter-token latency histograms, prompt and generation token counters; plus
requests and latency per route and status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from medvl.engine import EngineMetrics, EngineStats

ENGINE_STATS = {
    "prefills": "Prefill batches run", "prefill_rows": "Requests prefilled", "prefill_tokens": "Prompt tokens prefilled",
    "prefill_s": "Seconds in prefill (wall)", "steps": "Decoding steps launched",
    "step_rows": "Rows over all decoding steps", "step_launch_s": "Seconds spent queueing decoding steps (wall)",
    "grammar_masks": "Rows masked by their grammar (response_format, /extract)",
    "grammar_mask_s": "Seconds computing and applying grammar masks (wall)",
}

ROUTES = ("/extract", "/analyze", "/health", "/benchmark", "/metrics", "/v1/chat/completions", "/v1/models")


class ServerMetrics(EngineMetrics):
    """The registry of one app; the engine reports token-level events into it as they happen."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("medvl_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("medvl_request_latency_seconds", "HTTP request latency (end to end)", ["route"],
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.running = Gauge("medvl_num_requests_running", "Requests decoding in the engine", registry=r)
        self.waiting = Gauge("medvl_num_requests_waiting", "Requests waiting for a cache slot", registry=r)
        self.kv_usage = Gauge("medvl_kv_cache_usage_perc", "Share of the KV cache's tokens in use (0-1)", registry=r)
        self.loaded = Gauge("medvl_model_loaded", "1 when the model is ready", registry=r)
        self.ttft = Histogram("medvl_time_to_first_token_seconds", "Submit to first token", registry=r,
                              buckets=(0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.itl = Histogram("medvl_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             registry=r, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2))
        self.prompt = Counter("medvl_prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.generation = Counter("medvl_generation_tokens_total", "Tokens generated", registry=r)
        # The engine loop's own accounting (medvl.engine.EngineStats), cumulative since start.
        self.engine = {name: Gauge(f"medvl_engine_{name}", about, registry=r) for name, about in ENGINE_STATS.items()}
        self.finished = Counter("medvl_request_success_total", "Requests the engine ended, by reason",
                                ["finished_reason"], registry=r)

    # ---- EngineMetrics
    def prompt_tokens(self, n: int) -> None:
        self.prompt.inc(n)

    def generation_tokens(self, n: int) -> None:
        self.generation.inc(n)

    def time_to_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def request_finished(self, reason: str) -> None:
        self.finished.labels(reason).inc()

    # ---- per HTTP request, and at scrape time
    def record_http(self, route: str, status: int, seconds: float) -> None:
        known = route if route in ROUTES else "other"
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def render(self, running: int, waiting: int, kv_usage: float, loaded: bool, stats: EngineStats | None) -> str:
        for gauge, value in ((self.running, running), (self.waiting, waiting), (self.kv_usage, kv_usage),
                             (self.loaded, int(loaded))):
            gauge.set(value)
        if stats is not None:
            for name, gauge in self.engine.items():
                gauge.set(getattr(stats, name))
        return generate_latest(self.registry).decode()



