#!/usr/bin/env python3
"""Where the GPU's time goes while the engine serves the mixed workload, without HTTP.

The server's own benchmark (``bench/perf_serving.py``) says how many requests a second come
back; this one says what the GPU did meanwhile, to find what limits them. It loads the served
form as the server does (``medvl.engine.loader.open_served``), starts the engine's loop, and
runs ``--clients`` closed-loop client threads in-process: each draws a request of the mixed
workload (one of the phase-3 pages with its question, ``max_tokens`` from {32, 64, 128, 256},
half streamed, a quarter sampled at temperature 0.7, seeded), decodes the page's PNG and
prepares it in a pool of ``api.prepare_threads`` threads (as the server does), submits it and
waits. After ``--warm-up-s``, over ``--seconds``:

- requests/s and tokens/s as the engine served them (the server's figure minus HTTP);
- each engine turn's GPU time by kind, from CUDA events recorded around it on its stream: the
  decoding steps (by batch bucket), the prefills, the vision tower's calls (on its own stream);
  their sum against the window is how busy each stream kept the GPU;
- how many graphs ``torch.compile`` made meanwhile (0: start-up compiled every shape traffic brings);
- for ``--trace-s`` in the middle, ``torch.profiler``: every kernel's GPU time, grouped by kind
  (matrix products, attention, elementwise, copies ...), and the GPU's busy share (the union
  of every kernel's interval) with the idle gaps between kernels by length.

    python bench/profile_engine.py --profile 7b-random --weights bf16

Writes benchmarks/profile_engine.json (or --out), and the trace (Chrome format, xz) beside it
with --keep-trace. Runs on a CPU (tiny: a smoke run of the load alone: no GPU to time or trace).
"""

from __future__ import annotations

import argparse
import collections
import io
import lzma
import random
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.engine.loader import open_served
from medvl.engine.scheduler import Engine, SamplingParams
from medvl.evaluation.benchmark import ensure_benchmark_documents
from medvl.http.config import WEIGHTS
from medvl.pipeline.runner import log, run_tool

MIXED_MAX_TOKENS = (32, 64, 128, 256)  # as bench/perf_serving.py's mixed workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="bf16", choices=WEIGHTS, help="the served form (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop client threads (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window (default: %(default)s)")
    parser.add_argument("--warm-up-s", type=float, default=5.0, help="unmeasured seconds first (default: %(default)s)")
    parser.add_argument("--trace-s", type=float, default=2.0,
                        help="seconds of torch.profiler trace in the window's middle; 0: none (default: %(default)s)")
    parser.add_argument("--switch-interval-ms", type=float, default=0.0,
                        help="sys.setswitchinterval for this run (Python's default 5 ms: how long a thread "
                             "that wants the GIL waits for its holder); 0: leave it (default)")
    parser.add_argument("--keep-trace", action="store_true", help="write the Chrome trace beside the JSON (xz)")
    parser.add_argument("--out", default="", help="output JSON (default: benchmarks/profile_engine.json)")


# --------------------------------------------------------------------------- GPU time per engine turn


class TurnClock:
    """CUDA events around the engine's decoding steps, prefills and vision-tower calls, on the
    stream each runs on; read once the window ends (reading earlier would wait for the GPU)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.on = False
        self.marks: dict[str, list[tuple[Any, Any]]] = collections.defaultdict(list)
        self.lock = threading.Lock()

    def wrap(self, owner: Any, name: str, kind: Any) -> None:
        """Time ``owner.name`` (kind: a label, or a function of the call's arguments giving one)."""
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not (self.on and self.cuda):
                return original(*args, **kwargs)
            stream = self.engine._vision_stream if name == "_run_vision" and self.engine._vision_stream else None
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                return original(*args, **kwargs)
            finally:
                end.record(stream)
                with self.lock:
                    self.marks[kind(*args) if callable(kind) else kind].append((start, end))

        setattr(owner, name, timed)

    def summary(self, window_s: float) -> dict[str, dict[str, float]]:
        torch.cuda.synchronize()
        out = {}
        for kind, marks in sorted(self.marks.items()):
            ms = [start.elapsed_time(end) for start, end in marks]
            out[kind] = {"calls": len(ms), "gpu_ms_total": sum(ms), "gpu_ms_mean": sum(ms) / len(ms),
                         "share_of_window": sum(ms) / 1000 / window_s}
        return out


def instrument(engine: Engine, clock: TurnClock) -> None:
    """Decoding steps by bucket (the step's forward pass, choosing and recording the tokens,
    starting their copy to the host), prefills by rows, the vision tower by pages."""
    decoder = engine.decoder
    clock.wrap(engine, "_launch_step", lambda unread: f"decode step, bucket {decoder.bucket(len(engine.running))}")
    clock.wrap(engine, "_prefill", lambda requests, start, budget: f"prefill, {len(requests)} row(s)")
    clock.wrap(engine, "_run_vision", lambda jobs: "vision tower" + (" (several pages)" if len(jobs) > 1 else ""))


# --------------------------------------------------------------------------- the profiler's view


KERNEL_KINDS = (  # first match wins, on the lower-cased kernel name
    ("attention", ("fmha", "flash", "attention", "sdpa", "efficient")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk", "matmul", "triton_tem")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat")),
    ("softmax / sampling", ("softmax", "argmax", "exponential", "topk", "sort", "reduce", "max")),
    ("elementwise / norm (fused)", ("triton", "elementwise", "vectorized", "unrolled", "index")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lowered for w in words)), "other")


def trace_summary(prof: Any) -> dict[str, Any]:
    """Kernels by kind and name, the union of their intervals (GPU busy), and idle gaps by length."""
    kernels = [e for e in prof.profiler.kineto_results.events()
               if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0]
    if not kernels:
        return {"kernels": 0}
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in kernels)
    busy, gaps, (lo, hi) = 0, [], spans[0]
    for start, end in spans[1:]:
        if start > hi:
            busy += hi - lo
            gaps.append(start - hi)
            lo, hi = start, end
        else:
            hi = max(hi, end)
    busy += hi - lo
    covered = spans[-1][1] - spans[0][0]
    by_kind: dict[str, float] = collections.Counter()
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    streams: dict[int, float] = collections.Counter()
    for e in kernels:
        by_kind[kernel_kind(e.name())] += e.duration_ns() / 1e6
        by_name[e.name()][0] += 1
        by_name[e.name()][1] += e.duration_ns() / 1e6
        streams[e.device_resource_id()] += e.duration_ns() / 1e6
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:40]
    gap_bins = {"<10us": 0.0, "10-100us": 0.0, "100us-1ms": 0.0, ">=1ms": 0.0}
    for gap in gaps:
        us = gap / 1e3
        key = "<10us" if us < 10 else "10-100us" if us < 100 else "100us-1ms" if us < 1000 else ">=1ms"
        gap_bins[key] += gap / 1e6
    return {"kernels": len(kernels), "traced_ms": covered / 1e6, "busy_ms": busy / 1e6,
            "busy_share": busy / covered,
            "idle_ms_by_gap_length": {k: round(v, 2) for k, v in gap_bins.items()},
            "kernel_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "kernel_ms_by_stream": {str(k): round(v, 2) for k, v in streams.items()},
            "top_kernels": [{"name": name[:160], "kind": kernel_kind(name), "calls": calls, "ms": round(ms, 3)}
                            for name, (calls, ms) in top]}


# --------------------------------------------------------------------------- the load


class Clients:
    """Closed-loop client threads of the mixed workload, counting what ends inside the window."""

    def __init__(self, engine: Engine, pages: list[tuple[bytes, str]], prepare_threads: int) -> None:
        self.engine = engine
        self.pages = pages
        self.pool = ThreadPoolExecutor(prepare_threads, thread_name_prefix="prepare")
        self.stop = threading.Event()
        self.counting = False
        self.requests = 0
        self.tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def _prepare(self, page: bytes, prompt: str) -> Any:
        image = Image.open(io.BytesIO(page))
        image.load()
        return self.engine.prepare(image.convert("RGB"), prompt)

    def run(self, index: int) -> None:
        rng = random.Random(index)  # each client's own seeded stream, as perf_serving.py's clients
        while not self.stop.is_set():
            page, prompt = rng.choice(self.pages)
            max_tokens = rng.choice(MIXED_MAX_TOKENS)
            stream = rng.random() < 0.5
            sampled = rng.random() < 0.25
            params = SamplingParams(max_tokens=max_tokens, temperature=0.7 if sampled else 0.0,
                                    seed=rng.randrange(2**31) if sampled else None)
            pieces: list[str] = []
            try:
                prompt_ready = self.pool.submit(self._prepare, page, prompt).result()
                request = self.engine.submit(prompt_ready, params,
                                             (lambda piece, _lp, pieces=pieces: pieces.append(piece)) if stream else None)
                result = request.future.result()
            except Exception as exc:  # counted, never silent
                with self.lock:
                    self.errors[type(exc).__name__] += 1
                continue
            with self.lock:
                if self.counting:
                    self.requests += 1
                    self.tokens += result.generated_tokens


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (none should be made under traffic)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    pages = [(s.image_path.read_bytes(), s.prompt) for s in samples]
    if args.switch_interval_ms > 0:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    served, kind = open_served(settings, wd, "base", args.weights)
    started = time.perf_counter()
    served.load()
    load_s = time.perf_counter() - started
    engine = served.engine
    engine.start()
    clock = TurnClock(engine)
    instrument(engine, clock)
    clients = Clients(engine, pages, settings.api.prepare_threads)
    threads = [threading.Thread(target=clients.run, args=(i,), daemon=True) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.warm_up_s)
    before = dict(vars(engine.stats))
    graphs_before = _compiled_graphs()
    clients.counting, clock.on, window_started = True, True, time.perf_counter()
    trace = None
    lead = max(0.0, (args.seconds - args.trace_s) / 2)
    time.sleep(lead)
    if args.trace_s > 0 and clock.cuda:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            time.sleep(args.trace_s)
        trace = prof
    time.sleep(max(0.0, args.seconds - (time.perf_counter() - window_started)))
    clients.counting, clock.on = False, False
    window_s = time.perf_counter() - window_started
    stats = {k: v - before.get(k, 0) for k, v in vars(engine.stats).items()}
    compiled_in_window = _compiled_graphs() - graphs_before
    clients.stop.set()
    out = Path(args.out) if args.out else wd.bench("profile_engine")
    report = {**settings.record(("model", "decode", "api")), "command": shlex.join(["python", *sys.argv]),
              "weights": args.weights, "served": kind,
              "switch_interval_ms": sys.getswitchinterval() * 1000, "decoding": served.decoding, "load_and_warm_up_s": load_s,
              "clients": args.clients, "window_s": window_s, "requests": clients.requests,
              "requests_per_s": clients.requests / window_s, "output_tokens_per_s": clients.tokens / window_s,
              "tokens_per_request": clients.tokens / max(clients.requests, 1), "errors": dict(clients.errors),
              "graphs_compiled_in_window": compiled_in_window,
              "engine": {**stats, "rows_per_step": stats["step_rows"] / max(stats["steps"], 1),
                         "rows_per_prefill": stats["prefill_rows"] / max(stats["prefills"], 1)},
              "gpu_time_by_turn": clock.summary(window_s) if clock.cuda else {},
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if trace is not None:
        report["trace"] = trace_summary(trace)
        if args.keep_trace:
            raw = out.with_suffix(".trace.json")
            trace.export_chrome_trace(str(raw))
            with lzma.open(out.with_suffix(".trace.json.xz"), "wb") as packed:
                packed.write(raw.read_bytes())
            raw.unlink()
    atomic_write_json(out, report)
    log.info("%.2f requests/s, %.0f tokens/s, %.1f rows a step; GPU time by turn: %s", report["requests_per_s"],
             report["output_tokens_per_s"], report["engine"]["rows_per_step"],
             {k: round(v["share_of_window"], 3) for k, v in report["gpu_time_by_turn"].items()})
    if "trace" in report and "busy_share" in report["trace"]:
        log.info("trace: GPU busy %.1f%%; kernels by kind (ms): %s", 100 * report["trace"]["busy_share"],
                 report["trace"]["kernel_ms_by_kind"])
    served.stop()
    return report


if __name__ == "__main__":
    run_tool("profile_engine", (2,), main, __doc__, add_arguments)
