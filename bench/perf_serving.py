#!/usr/bin/env python3
"""Serving under load: closed-loop clients against the real HTTP server, as vLLM's serving
benchmark measures it.

Starts ``python -m medvl.http.server`` on the run's base model (``--weights`` picks the served form),
times process start to the first /health 200, then for each route and each client count runs
that many clients for ``--seconds``, each sending its next request as soon as the last one
answers. Routes:

- ``mixed`` (the headline, as real traffic comes): OpenAI chat requests, each drawing one of the
  five phase-3 pages (with its kind's question), ``max_tokens`` from {32, 64, 128, 256}, streamed
  or not (half each), greedy or sampled (a quarter at temperature 0.7, seeded); answers end at
  their end-of-sequence token or ``max_tokens``. Every client draws from its own seeded stream,
  so a rerun sends the same requests. Time to first token at the client for the streams (first
  content chunk) beside the engine's histogram;
- ``extract``: /extract on a phase-3 lab-report page (the record schema);
- ``chat``: OpenAI chat on that page, streamed with ``ignore_eos`` so that every answer is
  ``--max-tokens`` long (the fixed workload earlier figures were measured with). Per (route, clients) record:
requests/s, output tokens/s, end-to-end latency p50/p95, time to first token and inter-token
latency (per token, from the server's histograms over the window; the chat stream's client-side
chunk timings beside them), errors by status, the engine loop's accounting (prefill batches,
rows per step, time in prefill) and the server's peak GPU memory; ``--set`` overrides reach
the server too. The issue's figures for the engine this one replaced are kept as the baseline.

``--response-formats none,long`` runs each chat level once per format, in the same server, to
measure grammar-constrained decoding against free decoding: ``long`` is a JSON schema no answer
can close within ``--max-tokens`` (an array of at least 512 strings), so its rows run the full
length as ``ignore_eos`` rows do and the two compare token for token (``record``: the
extraction record's schema, whose answers end when their JSON closes).

    python bench/perf_serving.py --profile 7b-random --weights bf16
    python bench/perf_serving.py --profile 7b-random --routes chat --clients 1,32 --response-formats none,long

Writes benchmarks/perf_serving.json (or --out). Runs on a CPU too (tiny: a smoke run).
"""

import argparse
import asyncio
import base64
import json
import random
import re
import shlex
import sys
import time
from pathlib import Path

import httpx

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.stats import summarize
from medvl.core.workdir import Workdir
from medvl.evaluation.benchmark import ensure_benchmark_documents
from medvl.http.config import WEIGHTS
from medvl.http.validate import running_server
from medvl.medical.records import RECORD_SCHEMA
from medvl.pipeline.runner import log, run_tool

# The engine this one replaced, same H100 and page (issue 17): (form, route, clients) -> (requests/s, p50 s).
BASELINE = {
    "source": "issue 17, measured on one H100 80GB with 7b-random before the continuous-batching engine",
    "rows": [{"weights": w, "route": r, "clients": c, "requests_per_s": rps, "latency_p50_s": p50}
             for w, r, c, rps, p50 in (("int4", "chat", 1, 0.98, 1.01), ("int4", "extract", 8, 1.43, 5.6),
                                       ("int4", "chat", 8, 0.98, 8.1), ("int4", "extract", 32, 1.70, 18.5),
                                       ("bf16", "chat", 1, 1.02, 0.95), ("bf16", "extract", 8, 2.84, 2.8),
                                       ("bf16", "extract", 32, 4.17, 7.5))],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="bf16", choices=WEIGHTS, help="the served form (default: %(default)s)")
    parser.add_argument("--clients", default="1,8,32,64", help="client counts (default: %(default)s)")
    parser.add_argument("--routes", default="mixed,extract,chat",
                        help="mixed, extract and/or chat (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per level (default: %(default)s)")
    parser.add_argument("--warm-up-s", type=float, default=3.0, help="unmeasured seconds before each level")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer tokens per request (default: %(default)s)")
    parser.add_argument("--response-formats", default="none",
                        help=f"chat levels per response format, of {', '.join(RESPONSE_FORMATS)} (default: %(default)s)")
    parser.add_argument("--warm-restart", action="store_true",
                        help="then restart the server once and time it (compilation caches warm)")
    parser.add_argument("--out", default="", help="output JSON (default: benchmarks/perf_serving.json)")


class Level:
    """What the clients of one level observed."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.tokens = 0
        self.errors: dict[str, int] = {}

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


# Chat response formats a level can send ("none": free text with ignore_eos).
RESPONSE_FORMATS = {
    "none": None,
    "long": {"type": "json_schema", "json_schema": {"name": "long", "schema": {
        "type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 512}},
        "required": ["items"], "additionalProperties": False}}},
    "record": {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD_SCHEMA}},
}


async def extract_once(client: httpx.AsyncClient, page: bytes, level: Level) -> None:
    started = time.perf_counter()
    r = await client.post("/extract", files={"file": ("page.png", page, "image/png")})
    if r.status_code != 200:
        level.error(str(r.status_code))
        return
    level.latencies.append(time.perf_counter() - started)
    level.tokens += r.json()["usage"]["completion_tokens"]


async def chat_once(client: httpx.AsyncClient, payload: dict, level: Level) -> None:
    started = time.perf_counter()
    arrivals: list[float] = []
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
        if r.status_code != 200:
            level.error(str(r.status_code))
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                level.error(chunk["error"]["code"])
                return
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    level.latencies.append(time.perf_counter() - started)
    if arrivals:
        level.ttfts.append(arrivals[0] - started)
        level.itls.extend(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
    level.tokens += usage["completion_tokens"] if usage else len(arrivals)


MIXED_MAX_TOKENS = (32, 64, 128, 256)


def chat_payload(page: bytes, prompt: str, max_tokens: int) -> dict:
    return {"model": "medvl", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(page).decode()}},
                {"type": "text", "text": prompt}]}]}


def mixed_request(rng: random.Random, pages: list[tuple[bytes, str]]) -> dict:
    """One request of the mixed workload: a page and its question, an answer length, streamed or
    not, greedy or sampled (seeded)."""
    page, prompt = rng.choice(pages)
    payload = chat_payload(page, prompt, rng.choice(MIXED_MAX_TOKENS))
    if rng.random() < 0.5:
        payload.update(stream=True, stream_options={"include_usage": True})
    if rng.random() < 0.25:
        payload.update(temperature=0.7, seed=rng.randrange(2**31))
    return payload


async def chat_plain_once(client: httpx.AsyncClient, payload: dict, level: Level) -> None:
    started = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=payload)
    if r.status_code != 200:
        level.error(str(r.status_code))
        return
    level.latencies.append(time.perf_counter() - started)
    level.tokens += r.json()["usage"]["completion_tokens"]


async def run_level(base: str, route: str, clients: int, seconds: float, warm_up_s: float, page: bytes,
                    max_tokens: int, response_format: str = "none",
                    pages: list[tuple[bytes, str]] | None = None) -> Level:
    payload = {"model": "medvl", "max_tokens": max_tokens, "stream": True,
               "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(page).decode()}},
                   {"type": "text", "text": "List every lab value with its unit and flag."}]}]}
    if RESPONSE_FORMATS[response_format] is None:
        payload["ignore_eos"] = True
    else:
        payload["response_format"] = RESPONSE_FORMATS[response_format]
    level, discard = Level(), Level()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        measure_from = time.perf_counter() + warm_up_s
        stop_at = measure_from + seconds

        async def one_client(index: int) -> None:
            rng = random.Random(index)  # each client's own stream of mixed requests
            while time.perf_counter() < stop_at:
                target = level if time.perf_counter() >= measure_from else discard
                try:
                    if route == "extract":
                        await extract_once(client, page, target)
                    elif route == "mixed":
                        request = mixed_request(rng, pages)
                        await (chat_once if request.get("stream") else chat_plain_once)(client, request, target)
                    else:
                        await chat_once(client, payload, target)
                except httpx.HTTPError as exc:
                    target.error(type(exc).__name__)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return level


HISTOGRAMS = {"ttft_s": "medvl_time_to_first_token_seconds", "itl_s": "medvl_inter_token_latency_seconds"}


def server_counters(metrics_text: str) -> dict[str, float]:
    """The server's cumulative figures a level's deltas come from: TTFT/ITL histogram sums,
    counts and buckets, and the engine loop's accounting (medvl_engine_*)."""
    out = {}
    for line in metrics_text.splitlines():
        match = re.match(r"^(medvl_(?:time_to_first_token_seconds|inter_token_latency_seconds|engine_\w+?)"
                         r"(?:_(?:sum|count|bucket))?)(?:_total)?(\{[^}]*\})? (\S+)$", line)
        if match:
            le = re.search(r'le="([^"]+)"', match.group(2) or "")
            out[match.group(1) + (f"@{le.group(1)}" if le else "")] = float(match.group(3))
    return out


def histogram_summary(name: str, delta: dict[str, float]) -> dict[str, float]:
    """Mean and bucket-interpolated p50/p95 of a server histogram over a level."""
    count = delta.get(f"{name}_count", 0.0)
    if not count:
        return {"avg": 0.0, "p50": 0.0, "p95": 0.0, "n": 0}
    buckets = sorted((float(k.split("@")[1]), v) for k, v in delta.items() if k.startswith(f"{name}_bucket@"))

    def quantile(q: float) -> float:
        lower, below = 0.0, 0.0
        for upper, cumulative in buckets:
            if cumulative >= q * count:
                if upper == float("inf"):
                    return lower
                return lower + (upper - lower) * (q * count - below) / max(cumulative - below, 1e-9)
            lower, below = upper, cumulative
        return lower

    return {"avg": delta[f"{name}_sum"] / count, "p50": quantile(0.5), "p95": quantile(0.95), "n": int(count)}


def level_record(route: str, clients: int, seconds: float, window_s: float, level: Level, before: dict,
                 after: dict, health: dict) -> dict:
    """One level's figures; the server's (histograms, engine) cover ``window_s``, warm-up included."""
    done = len(level.latencies)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    engine = {k.removeprefix("medvl_engine_"): v for k, v in delta.items() if k.startswith("medvl_engine_")}
    record = {"route": route, "clients": clients, "seconds": seconds, "requests": done,
              "errors": sum(level.errors.values()), "errors_by_kind": level.errors,
              "requests_per_s": done / seconds, "output_tokens_per_s": level.tokens / seconds,
              "tokens_per_request": level.tokens / done if done else 0.0,
              "latency_s": summarize(level.latencies),
              # per token, from the server's histograms (bucket-interpolated percentiles)
              **{key: histogram_summary(name, delta) for key, name in HISTOGRAMS.items()},
              "engine": {**engine, "rows_per_prefill": engine.get("prefill_rows", 0) / max(engine.get("prefills", 0), 1),
                         "rows_per_step": engine.get("step_rows", 0) / max(engine.get("steps", 0), 1),
                         "window_s": window_s, "prefill_share_of_window": engine.get("prefill_s", 0) / window_s},
              "server_peak_gpu_memory_mb": health.get("gpu_memory_peak_mb")}
    if route in ("chat", "mixed"):  # as the client saw the streams: text chunks (tokens that decode to none send none)
        record["client_ttft_s"] = summarize(level.ttfts)
        record["client_chunk_gap_s"] = summarize(level.itls)
    return record


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    formats = args.response_formats.split(",")
    unknown = [f for f in formats if f not in RESPONSE_FORMATS]
    if unknown:
        raise SystemExit(f"error: --response-formats: unknown {unknown}; choose from {', '.join(RESPONSE_FORMATS)}")
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    sample = next((s for s in samples if "lab" in s.doc_id), samples[0])
    page = sample.image_path.read_bytes()
    pages = [(s.image_path.read_bytes(), s.prompt) for s in samples]
    out = Path(args.out) if args.out else wd.bench("perf_serving")
    report = {**settings.record(("model", "decode")), "command": shlex.join(["python", *sys.argv]),
              "weights": args.weights, "page": sample.doc_id, "mixed_pages": [s.doc_id for s in samples],
              "mixed_max_tokens": MIXED_MAX_TOKENS,
              "max_tokens": args.max_tokens, "baseline": BASELINE, "levels": []}
    timing: dict[str, float] = {}
    server_args = ["--weights", args.weights, "--max-new-tokens", str(args.max_tokens),
                   "--request-timeout-s", "600",
                   *(f"--set={item}" for item in args.set)]
    with running_server(wd.root, settings.profile, server_args, ready_timeout_s=1800, timing=timing) as base:
        health = httpx.get(f"{base}/health", timeout=10).json()
        report.update({"startup_to_health_200_s": timing["ready_s"], "startup_s": health["startup_s"],
                       "decoding": health["decoding"], "device": health["device"], "gpu": health["gpu_name"]})
        log.info("server ready after %.1f s: %s %s", timing["ready_s"], health["decoding"], health["startup_s"])
        levels = [(route, clients, fmt) for route in args.routes.split(",")
                  for clients in (int(c) for c in args.clients.split(","))
                  for fmt in (formats if route == "chat" else ["none"])]
        for route, clients, fmt in levels:
            before = server_counters(httpx.get(f"{base}/metrics", timeout=10).text)
            level = asyncio.run(run_level(base, route, clients, args.seconds, args.warm_up_s, page, args.max_tokens,
                                          fmt, pages))
            after = server_counters(httpx.get(f"{base}/metrics", timeout=10).text)
            health = httpx.get(f"{base}/health", timeout=10).json()
            record = level_record(route, clients, args.seconds, args.seconds + args.warm_up_s, level, before, after, health)
            record["response_format"] = fmt
            report["levels"].append(record)
            log.info("%-7s %3d clients %-6s: %6.2f req/s  %7.1f tok/s  p50 %.2f s  p95 %.2f s  ttft p50 %.3f  "
                     "itl p50 %.4f  errors %d", route, clients, fmt, record["requests_per_s"],
                     record["output_tokens_per_s"], record["latency_s"]["p50"], record["latency_s"]["p95"],
                     record["ttft_s"]["p50"], record["itl_s"]["p50"], record["errors"])
            log.info("        engine: %s", {k: round(v, 3) for k, v in record["engine"].items()})
            atomic_write_json(out, report)  # after every level: a run cut short keeps what it measured
    if args.warm_restart:
        with running_server(wd.root, settings.profile, server_args, ready_timeout_s=1800, timing=timing) as base:
            report["warm_restart"] = {"to_health_200_s": timing["ready_s"],
                                      "startup_s": httpx.get(f"{base}/health", timeout=10).json()["startup_s"]}
        log.info("warm restart: /health 200 after %.1f s", timing["ready_s"])
        atomic_write_json(out, report)
    return report


if __name__ == "__main__":
    run_tool("perf_serving", (2,), main, __doc__, add_arguments)
