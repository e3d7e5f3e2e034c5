"""One benchmark harness for every model variant (phases 3, 4, 7 and 8).

Comparisons are only honest when every variant is measured the same way, so this is the
only place that times generation:

- warm-up runs first (kernel selection, allocator growth and lazy init stay out of numbers);
- CUDA-synchronised timing around each request;
- every answer through the serving engine (:mod:`medvl.engine.scheduler`), as the API gives it; time
  to first token is preprocessing plus the engine's submit-to-first-token time;
- per-sample latency, TTFT, generated tokens, tokens/s, and avg/min/max/p50/p95;
- memory before load, after load and peak: torch allocator and NVML on a GPU, process RSS
  on a CPU (labelled), plus the weights' own footprint (``get_memory_footprint``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from medvl.core.stats import summarize
from medvl.medical.prompts import BENCHMARK_PROMPTS
from medvl.model.loading import input_device
from medvl.model.memory import (
    _sync,
    headline_memory_mb,
    memory_kind,
    memory_now,
    peak_memory_mb,
    reset_peak_memory,
    unload,
    weights_footprint_mb,
)

log = logging.getLogger(__name__)


@dataclass
class BenchSample:
    doc_id: str
    image_path: Path
    prompt: str


# --------------------------------------------------------------------------- timing


def generate_timed(engine: Any, image: Image.Image, prompt: str, max_new_tokens: int,
                   response_format: Any = None) -> dict[str, Any]:
    """One request through the engine, timed end to end (preprocessing included, as a user
    would see it); greedy, ending at the end-of-sequence token or ``max_new_tokens``; under
    ``response_format`` (a :class:`medvl.engine.grammar.ResponseFormat`) when given."""
    from medvl.engine.scheduler import SamplingParams

    _sync()
    start = time.perf_counter()
    prepared = engine.prepare(image, prompt)
    submitted = time.perf_counter()
    result = engine.generate(prepared, SamplingParams(max_new_tokens, response_format=response_format))
    _sync()
    latency = time.perf_counter() - start
    n_new = result.generated_tokens
    ttft = (submitted - start) + result.ttft_s
    decode_time = latency - ttft
    image_token_id = getattr(engine.model.config, "image_token_id", None)
    input_ids = prepared.tensors["input_ids"]
    return {
        "prompt_tokens": prepared.length,
        "image_tokens": int((input_ids == image_token_id).sum()) if image_token_id is not None else None,
        "generated_tokens": n_new,
        "latency_s": latency,
        "ttft_s": ttft,
        "tokens_per_s": n_new / latency if latency > 0 else 0.0,
        "decode_tokens_per_s": (n_new - 1) / decode_time if n_new > 1 and decode_time > 0 else 0.0,
        "response": result.text,
        "finish_reason": result.finish_reason,
        "closed_early": result.closed_early,
    }


def timed_load(loader: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run ``loader`` and measure load time and memory before/after it."""
    reset_peak_memory()
    before = memory_now()
    _sync()
    start = time.perf_counter()
    model = loader()
    _sync()
    load_s = time.perf_counter() - start
    after = memory_now()
    return model, {"load_time_s": load_s, "before_load": before, "after_load": after,
                   "weights_footprint_mb": weights_footprint_mb(model)}


def make_engine(model: Any, processor: Any, decode: Any, sample: BenchSample) -> tuple[Any, float]:
    """The serving engine over ``model`` (one cache slot: requests are timed one at a time),
    warmed up (compiled, per ``decode.compile``) on ``sample``; returns it and the seconds
    the warm-up took."""
    from medvl.engine.loader import build_engine, warm_up

    started = time.perf_counter()
    engine = build_engine(model, processor, decode, slots=1)
    warm_up(engine, Image.open(sample.image_path).convert("RGB"), sample.prompt)
    return engine, time.perf_counter() - started


def run_benchmark(model: Any, processor: Any, samples: list[BenchSample], max_new_tokens: int,
                  warmup_runs: int, label: str, decode: Any) -> dict[str, Any]:
    """Warm up, then time every sample; returns per-sample rows and aggregates.

    ``decode`` (the settings' decode section) configures the serving engine every answer goes
    through; its one-off compilation is timed apart (``decoder_warm_up_s``), never inside a sample.
    """
    images = {s.doc_id: Image.open(s.image_path).convert("RGB") for s in samples}
    engine, warm_up_s = make_engine(model, processor, decode, samples[0])
    for _ in range(warmup_runs):
        generate_timed(engine, images[samples[0].doc_id], samples[0].prompt, max_new_tokens)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = []
    for sample in tqdm(samples, desc=f"benchmark {label}", unit="doc"):
        row = generate_timed(engine, images[sample.doc_id], sample.prompt, max_new_tokens)
        rows.append({"doc_id": sample.doc_id, "prompt": sample.prompt, **row})
        log.info("%s %-32s %5.2f s  ttft %5.3f s  %3d tok  %6.1f tok/s", label, sample.doc_id,
                 row["latency_s"], row["ttft_s"], row["generated_tokens"], row["tokens_per_s"])
    return {
        "samples": rows,
        "aggregate": {
            "latency_s": summarize([r["latency_s"] for r in rows]),
            "ttft_s": summarize([r["ttft_s"] for r in rows]),
            "tokens_per_s": summarize([r["tokens_per_s"] for r in rows]),
            "decode_tokens_per_s": summarize([r["decode_tokens_per_s"] for r in rows]),
            "generated_tokens": summarize([float(r["generated_tokens"]) for r in rows]),
            "prompt_tokens": summarize([float(r["prompt_tokens"]) for r in rows]),
        },
        "peak_memory_mb": peak_memory_mb(),
        "decoder": engine.decoder.description,
        "decoder_warm_up_s": warm_up_s,
        "warmup_runs": warmup_runs,
        "max_new_tokens": max_new_tokens,
    }


def summary_table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table comparing benchmark records (phase output and logs)."""
    header = f"{'variant':<22}{'load s':>8}{'mem MB':>10}{'peak MB':>10}{'p50 s':>8}{'p95 s':>8}{'TTFT s':>8}{'tok/s':>8}"
    lines = [header, "-" * len(header)]
    for name, rec in rows:
        agg = rec["aggregate"]
        lines.append(f"{name:<22}{rec['load']['load_time_s']:>8.2f}"
                     f"{headline_memory_mb(rec['load']['after_load']):>10.1f}{rec['peak_memory_mb']:>10.1f}"
                     f"{agg['latency_s']['p50']:>8.3f}{agg['latency_s']['p95']:>8.3f}"
                     f"{agg['ttft_s']['avg']:>8.3f}{agg['tokens_per_s']['avg']:>8.1f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the shared test set


def ensure_benchmark_documents(folder: Path, seed: int, count: int) -> list[BenchSample]:
    """Write the phase-3 documents once; later phases reuse the very same files.

    Existing files are kept when their ground truth matches what the seed generates, so a
    rerun never silently swaps the documents every benchmark is measured on.
    """
    from medvl.core.io import read_json
    from medvl.medical.documents import benchmark_documents, save_document

    for doc in benchmark_documents(seed, count):
        image, truth = folder / f"{doc.doc_id}.png", folder / f"{doc.doc_id}.json"
        current = None
        if image.is_file() and truth.is_file():
            try:
                current = read_json(truth).get("text")
            except Exception:
                current = None
        if current != doc.text:
            save_document(doc, folder)
    return load_benchmark_samples(folder)


def load_benchmark_samples(folder: Path) -> list[BenchSample]:
    """The documents phase 3 wrote, with their prompts (raises if phase 3 has not run)."""
    from medvl.core.io import OutputError, read_json

    truths = sorted(folder.glob("*.json"))
    if not truths:
        raise OutputError(f"no benchmark documents in {folder}; run phase 3 first")
    samples = []
    for truth in truths:
        data = read_json(truth)
        samples.append(BenchSample(data["doc_id"], truth.with_suffix(".png"), BENCHMARK_PROMPTS[data["kind"]]))
    return samples


def benchmark_variant(label: str, loader: Callable[[], Any], processor: Any,
                      samples: list[BenchSample], max_new_tokens: int, warmup_runs: int,
                      decode: Any) -> dict[str, Any]:
    """Load a variant, benchmark it, free it: the record phases 3, 4 and 7 save."""
    model, load = timed_load(loader)
    device = str(input_device(model))
    result = run_benchmark(model, processor, samples, max_new_tokens, warmup_runs, label, decode)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result.update({"label": label, "load": load, "device": device, "gpu": gpu,
                   "memory_kind": memory_kind(), "dtype": str(getattr(model, "dtype", ""))})
    unload(model)
    return result
