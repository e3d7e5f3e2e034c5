#!/usr/bin/env python3
"""The fused elementwise kernels on a GPU: the same outputs as the eager ones, and what they save.

Loads the run's base model as the server serves it (fused projections, aligned vision MLP),
then for each phase-3 page runs the vision tower and a whole forward pass (the page's
next-token logits) with :func:`medvl.model.fused_ops.fuse_elementwise`'s plain kernels (the
eager math transformers runs) and again with its compiled ones: relative L2 and top-token
agreement of the logits, relative L2 of the tower's output, and each one's GPU time (CUDA
events, median of ``--repeats`` after a warm-up; compilation timed apart).

    python bench/check_fused_ops.py --profile 7b-random

Writes benchmarks/check_fused_ops.json (or --out). Needs a CUDA GPU.
"""

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.evaluation.benchmark import ensure_benchmark_documents
from medvl.model.compare import build_inputs, relative_l2
from medvl.model.fused_ops import fuse_elementwise
from medvl.model.fusion import fuse_projections
from medvl.model.loading import input_device, load_model, load_processor
from medvl.model.vision import align_vision_mlp
from medvl.pipeline.runner import PhaseError, log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per page and kernel kind")
    parser.add_argument("--out", default="", help="output JSON (default: benchmarks/check_fused_ops.json)")


def gpu_ms(fn, repeats: int) -> tuple[float, object]:
    """Median GPU milliseconds of ``fn()`` over ``repeats`` runs, and its last output."""
    times, out = [], None
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out


def run_pages(model, inputs: list, repeats: int) -> list[dict]:
    """Each page's tower output and next-token logits, and their GPU times."""
    results = []
    with torch.inference_mode():
        for page in inputs:
            tower_ms, tower = gpu_ms(lambda page=page: model.model.get_image_features(
                page["pixel_values"], page["image_grid_thw"]).pooler_output[0], repeats)
            forward_ms, logits = gpu_ms(lambda page=page: model(**page).logits[0, -1].float(), repeats)
            results.append({"tower": tower.float().cpu(), "logits": logits.cpu(), "tower_ms": tower_ms,
                            "forward_ms": forward_ms})
    return results


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise PhaseError("check_fused_ops needs a CUDA GPU")
    model_dir = wd.models / f"{settings.model.slug}-base"
    model = load_model(model_dir, settings)
    processor = load_processor(model_dir, settings)
    fuse_projections(model)
    align_vision_mlp(model)
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    inputs = []
    for sample in samples:
        with Image.open(sample.image_path) as image:
            inputs.append(build_inputs(processor, [image.convert("RGB")], [sample.prompt], input_device(model)))
    fuse_elementwise(model, compiled=False)
    run_pages(model, inputs[:1], 1)  # warm-up (cuBLAS heuristics, allocator)
    plain = run_pages(model, inputs, args.repeats)
    fuse_elementwise(model, compiled=True)
    started = time.perf_counter()
    run_pages(model, inputs, 1)  # compiles (dynamic shapes: once, plus a specialisation or two)
    compile_s = time.perf_counter() - started
    fused = run_pages(model, inputs, args.repeats)
    pages = []
    for sample, a, b in zip(samples, plain, fused, strict=True):
        pages.append({"page": sample.doc_id, "tokens": int(inputs[len(pages)]["input_ids"].shape[1]),
                      "logits_relative_l2": relative_l2(b["logits"], a["logits"]),
                      "same_top_token": bool(a["logits"].argmax() == b["logits"].argmax()),
                      "tower_relative_l2": relative_l2(b["tower"], a["tower"]),
                      "tower_ms": {"plain": a["tower_ms"], "fused": b["tower_ms"]},
                      "forward_ms": {"plain": a["forward_ms"], "fused": b["forward_ms"]}})
    report = {**settings.record(("model",)), "command": shlex.join(["python", *sys.argv]),
              "device": torch.cuda.get_device_name(), "compile_s": compile_s, "pages": pages,
              "median": {key: {kind: statistics.median(p[key][kind] for p in pages) for kind in ("plain", "fused")}
                         for key in ("tower_ms", "forward_ms")},
              "worst_logits_relative_l2": max(p["logits_relative_l2"] for p in pages),
              "same_top_token": sum(p["same_top_token"] for p in pages)}
    out = Path(args.out) if args.out else wd.bench("check_fused_ops")
    atomic_write_json(out, report)
    log.info("fused elementwise: tower %s ms, whole forward %s ms (median plain -> fused); logits rel. L2 <= %.2e, "
             "top token equal on %d/%d pages; compile %.1f s", report["median"]["tower_ms"],
             report["median"]["forward_ms"], report["worst_logits_relative_l2"], report["same_top_token"],
             len(pages), compile_s)
    return report


if __name__ == "__main__":
    run_tool("check_fused_ops", (2,), main, __doc__, add_arguments)
