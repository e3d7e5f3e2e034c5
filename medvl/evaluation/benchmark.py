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

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from medvl.core.stats import summarize
from medvl.engine.pages import PageLimits
from medvl.medical.prompts import BENCHMARK_PROMPTS, EXTRACTION_PROMPT
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
    image_path: Path  # a page image; for a multi-page document (load_benchmark_pdfs) its PDF
    prompt: str


# --------------------------------------------------------------------------- timing


def generate_timed(engine: Any, image: Image.Image, prompt: str, max_new_tokens: int,
                   response_format: Any = None, confidences: bool = False) -> dict[str, Any]:
    """One request through the engine, timed end to end (preprocessing included, as a user
    would see it); greedy, ending at the end-of-sequence token or ``max_new_tokens``; under
    ``response_format`` (a :class:`medvl.engine.grammar.ResponseFormat`) when given. With
    ``confidences``, each field of the JSON answer's confidence (``field_confidence``, as
    /extract computes it: medvl.engine.tokens.record_page; none for an answer that did not parse)."""
    from medvl.engine.scheduler import SamplingParams
    from medvl.engine.tokens import record_page

    _sync()
    start = time.perf_counter()
    prepared = engine.prepare(image, prompt)
    submitted = time.perf_counter()
    params = SamplingParams(max_new_tokens, response_format=response_format, logprobs=0 if confidences else None)
    result = engine.generate(prepared, params)
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
        **({"field_confidence": record_page(result, engine.processor.tokenizer).get("confidence", {})}
           if confidences else {}),
    }


def generate_pages_timed(engine: Any, pages: list[Image.Image], prompts: list[str],
                         max_new_tokens: int, confidences: bool = False) -> dict[str, Any]:
    """A document's pages answered as /extract answers a PDF, timed end to end: each page
    prepared with its prompt and decoded under the record's schema (side by side as the
    engine's slots allow), their records merged with each item's page; the row
    :func:`generate_timed` gives, its response the merged record. With ``confidences``, each
    item's confidence by its pointer into the merged record (``item_confidence``, as /extract
    gives it)."""
    from medvl.engine.grammar import RECORD_FORMAT
    from medvl.engine.scheduler import SamplingParams
    from medvl.engine.tokens import record_page
    from medvl.medical.confidence import document_confidences
    from medvl.medical.records import document_result

    _sync()
    start = time.perf_counter()
    prepared = [engine.prepare(page, prompt) for page, prompt in zip(pages, prompts, strict=True)]
    submitted = time.perf_counter()
    params = SamplingParams(max_new_tokens, response_format=RECORD_FORMAT, logprobs=0 if confidences else None)
    results = engine.generate_many(prepared, [params] * len(pages))
    _sync()
    latency = time.perf_counter() - start
    page_records = [record_page(result, engine.processor.tokenizer) for result in results]
    document = document_result(page_records)
    if confidences:
        document_confidences(document, page_records, below=0.0)
    generated = sum(result.generated_tokens for result in results)
    return {
        "pages": len(pages), "prompt_tokens": sum(p.length for p in prepared), "generated_tokens": generated,
        "latency_s": latency, "ttft_s": (submitted - start) + min(result.ttft_s for result in results),
        "tokens_per_s": generated / latency if latency > 0 else 0.0,
        "response": json.dumps(document["structured"]),
        "finish_reason": "length" if any(r.finish_reason == "length" for r in results) else results[0].finish_reason,
        "closed_early": any(result.closed_early for result in results),
        "items_by_page": dict(Counter(item["page"] for item in document["items"])),
        **({"item_confidence": {item["pointer"]: item["confidence"] for item in document["items"]}}
           if confidences else {}),
    }


def generate_document_timed(engine: Any, sample: BenchSample, max_new_tokens: int,
                            limits: PageLimits) -> dict[str, Any]:
    """A PDF benchmark document, timed from its bytes: rendered (per ``limits``, as the server
    renders uploads), then :func:`generate_pages_timed`."""
    from medvl.engine.pages import decode_pages

    _sync()
    start = time.perf_counter()
    pages = decode_pages(sample.image_path.read_bytes(), limits)
    render_s = time.perf_counter() - start
    row = generate_pages_timed(engine, pages, [sample.prompt] * len(pages), max_new_tokens)
    return {"doc_id": sample.doc_id, **row, "latency_s": row["latency_s"] + render_s, "render_s": render_s}


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


def make_engine(model: Any, processor: Any, decode: Any, sample: BenchSample, slots: int = 1) -> tuple[Any, float]:
    """The serving engine over ``model`` (one cache slot by default: requests are timed one at a
    time), warmed up (compiled, per ``decode.compile``) on ``sample``; returns it and the seconds
    the warm-up took."""
    from medvl.engine.loader import build_engine, warm_up

    started = time.perf_counter()
    engine = build_engine(model, processor, decode, slots=slots)
    warm_up(engine, Image.open(sample.image_path).convert("RGB"), sample.prompt)
    return engine, time.perf_counter() - started


def run_benchmark(model: Any, processor: Any, samples: list[BenchSample], max_new_tokens: int,
                  warmup_runs: int, label: str, decode: Any, documents: Sequence[BenchSample] = (),
                  pdf_limits: PageLimits | None = None) -> dict[str, Any]:
    """Warm up, then time every sample; returns per-sample rows and aggregates.

    ``decode`` (the settings' decode section) configures the serving engine every answer goes
    through; its one-off compilation is timed apart (``decoder_warm_up_s``), never inside a sample.
    ``documents`` (multi-page PDFs, rendered per ``pdf_limits``) are timed per document after the
    pages, under ``documents``: their rows stay out of the per-page aggregates, which earlier runs
    compare with.
    """
    if documents and pdf_limits is None:
        raise ValueError("PDF documents need the limits to render them with (pdf_limits)")
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
    document_rows = [generate_document_timed(engine, sample, max_new_tokens, pdf_limits)
                     for sample in tqdm(documents, desc=f"benchmark {label} PDFs", unit="doc")]
    return {
        "samples": rows,
        "documents": document_rows,
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
    """Write the phase-3 documents once (the pages, and the two-page PDF); later phases reuse
    the very same files; returns the pages' samples.

    Existing files are kept when their ground truth matches what the seed generates, so a
    rerun never silently swaps the documents every benchmark is measured on.
    """
    from medvl.medical.documents import (
        benchmark_documents,
        packet_documents,
        pdf_document_id,
        pdf_ground_truth,
        save_document,
        save_pdf_document,
    )

    for doc in benchmark_documents(seed, count):
        if _stored_text(folder, doc.doc_id, ".png") != doc.text:
            save_document(doc, folder)
    packet = packet_documents(seed)
    if _stored_text(folder, pdf_document_id(seed), ".pdf") != pdf_ground_truth(pdf_document_id(seed), packet)["text"]:
        save_pdf_document(pdf_document_id(seed), packet, folder)
    return load_benchmark_samples(folder)


def _stored_text(folder: Path, doc_id: str, suffix: str) -> str | None:
    """The text of a stored document's truth, None when it or its file is missing or unreadable."""
    from medvl.core.io import read_json

    document, truth = folder / f"{doc_id}{suffix}", folder / f"{doc_id}.json"
    if not (document.is_file() and truth.is_file()):
        return None
    try:
        return read_json(truth).get("text")
    except Exception:
        return None


def _truths(folder: Path) -> list[dict[str, Any]]:
    from medvl.core.io import OutputError, read_json

    truths = [read_json(path) for path in sorted(folder.glob("*.json"))]
    if not truths:
        raise OutputError(f"no benchmark documents in {folder}; run phase 3 first")
    return truths


def load_benchmark_samples(folder: Path) -> list[BenchSample]:
    """The pages phase 3 wrote, with their prompts (raises if phase 3 has not run)."""
    return [BenchSample(data["doc_id"], folder / f"{data['doc_id']}.png", BENCHMARK_PROMPTS[data["kind"]])
            for data in _truths(folder) if data["kind"] != "pdf"]


def load_benchmark_pdfs(folder: Path) -> list[BenchSample]:
    """The multi-page PDFs phase 3 wrote, each asked for its record as /extract asks."""
    return [BenchSample(data["doc_id"], folder / f"{data['doc_id']}.pdf", EXTRACTION_PROMPT)
            for data in _truths(folder) if data["kind"] == "pdf"]


def benchmark_variant(label: str, loader: Callable[[], Any], processor: Any,
                      samples: list[BenchSample], max_new_tokens: int, warmup_runs: int,
                      decode: Any, documents: Sequence[BenchSample] = (),
                      pdf_limits: PageLimits | None = None) -> dict[str, Any]:
    """Load a variant, benchmark it, free it: the record phases 3, 4 and 7 save."""
    model, load = timed_load(loader)
    device = str(input_device(model))
    result = run_benchmark(model, processor, samples, max_new_tokens, warmup_runs, label, decode, documents,
                           pdf_limits)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result.update({"label": label, "load": load, "device": device, "gpu": gpu,
                   "memory_kind": memory_kind(), "dtype": str(getattr(model, "dtype", ""))})
    unload(model)
    return result
