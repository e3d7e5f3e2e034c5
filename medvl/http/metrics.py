"""Prometheus metrics, named as vLLM names them (with a ``medvl_`` prefix and a ``model_name``
label), so a serving engineer's dashboards read them: running and waiting requests, KV-cache
usage (slots reserved, as a full cache reads 1) and tokens filled, time to first token and
inter-token latency histograms, prompt and generation token counters, the engine loop's totals
as counters; plus requests and latency per route and status (a stream's at its end)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from medvl.engine.scheduler import Engine, EngineMetrics, EngineStats

# EngineStats field -> (counter name after ``medvl_engine_``, help). Units spelt out, as
# Prometheus's naming rules (and `promtool check metrics`) want: "seconds", never "s".
ENGINE_STATS = {
    "prefills": ("prefills", "Prefill batches run"),
    "prefill_rows": ("prefill_rows", "Requests prefilled"),
    "prefill_tokens": ("prefill_tokens", "Prompt tokens prefilled"),
    "prefill_s": ("prefill_seconds", "Seconds in prefill (wall)"),
    "steps": ("steps", "Decoding steps launched"),
    "step_rows": ("step_rows", "Rows over all decoding steps"),
    "step_launch_s": ("step_launch_seconds", "Seconds spent queueing decoding steps (wall)"),
    "grammar_masks": ("grammar_masks", "Rows masked by their grammar (response_format, /extract)"),
    "grammar_mask_s": ("grammar_mask_seconds", "Seconds computing and applying grammar masks (wall)"),
}

ROUTES = ("/extract", "/analyze", "/health", "/benchmark", "/metrics", "/v1/chat/completions", "/v1/models")


class _EngineTotals:
    """The engine loop's cumulative accounting (:class:`medvl.engine.scheduler.EngineStats`) as counters,
    read at scrape time (they only grow: a dashboard takes their rate)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: EngineStats | None = None

    def collect(self):
        for field, (name, about) in ENGINE_STATS.items():
            family = CounterMetricFamily(f"medvl_engine_{name}", about, labels=["model_name"])
            family.add_metric([self.model_name], float(getattr(self.stats, field)) if self.stats else 0.0)
            yield family


class ServerMetrics(EngineMetrics):
    """The registry of one app; the engine reports token-level events into it as they happen.
    Engine metrics carry a ``model_name`` label (the served model name, as vLLM's dashboards
    filter on it)."""

    def __init__(self, model_name: str = "medvl") -> None:
        r = self.registry = CollectorRegistry()
        self.model_name = model_name
        model = ["model_name"]
        self.requests = Counter("medvl_requests_total", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("medvl_request_latency_seconds",
                                 "HTTP request latency (end to end; a stream's at its last byte)", ["route"],
                                 registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.running = Gauge("medvl_num_requests_running", "Requests decoding in the engine", model, registry=r)
        self.waiting = Gauge("medvl_num_requests_waiting", "Requests waiting for a cache slot", model, registry=r)
        self.waiting_limit = Gauge("medvl_num_requests_waiting_limit",
                                   "Waiting requests the engine admits (decode.max_waiting); past it, 503",
                                   model, registry=r)
        self.kv_usage = Gauge("medvl_kv_cache_usage_perc",
                              "Share of the KV cache reserved by running requests (each holds a whole slot; 0-1)",
                              model, registry=r)
        self.kv_filled = Gauge("medvl_kv_cache_filled_perc", "Share of the KV cache's token positions filled (0-1)",
                               model, registry=r)
        self.loaded = Gauge("medvl_model_loaded", "1 when the model is ready", model, registry=r)
        self.dead = Gauge("medvl_engine_dead", "1 when the engine loop died (/health answers 503 until a restart)",
                          model, registry=r)
        self.ttft = Histogram("medvl_time_to_first_token_seconds", "Submit to first token", model, registry=r,
                              buckets=(0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        self.itl = Histogram("medvl_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             model, registry=r, buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2))
        self.prompt = Counter("medvl_prompt_tokens_total", "Prompt tokens prefilled", model, registry=r)
        self.generation = Counter("medvl_generation_tokens_total", "Tokens generated", model, registry=r)
        self.finished = Counter("medvl_request_success_total", "Requests the engine ended, by reason",
                                ["model_name", "finished_reason"], registry=r)
        self.totals = _EngineTotals(model_name)
        r.register(self.totals)

    # ---- EngineMetrics
    def prompt_tokens(self, n: int) -> None:
        self.prompt.labels(self.model_name).inc(n)

    def generation_tokens(self, n: int) -> None:
        self.generation.labels(self.model_name).inc(n)

    def time_to_first_token(self, seconds: float) -> None:
        self.ttft.labels(self.model_name).observe(seconds)

    def inter_token_latency(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)

    def request_finished(self, reason: str) -> None:
        self.finished.labels(self.model_name, reason).inc()

    # ---- per HTTP request, and at scrape time
    def record_http(self, route: str, status: int, seconds: float) -> None:
        known = route if route in ROUTES else "other"
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def render(self, engine: Engine | None) -> str:
        """The exposition text, with the engine's gauges read now (zeros while it loads)."""
        m = self.model_name
        self.loaded.labels(m).set(int(engine is not None))
        self.dead.labels(m).set(int(engine is not None and engine.dead is not None))
        self.running.labels(m).set(engine.num_running if engine else 0)
        self.waiting.labels(m).set(engine.num_waiting if engine else 0)
        self.waiting_limit.labels(m).set(engine.max_waiting if engine else 0)
        self.kv_usage.labels(m).set(engine.kv_cache_reserved if engine else 0.0)
        self.kv_filled.labels(m).set(engine.kv_cache_filled if engine else 0.0)
        self.totals.stats = engine.stats if engine else None
        return generate_latest(self.registry).decode()
