#!/usr/bin/env python3
"""The fused elementwise kernels on a GPU: the same outputs as the eager ones, and what they save.

Loads the run's base model as the server serves it (fused projections, aligned vision MLP),
then for each phase-3 page runs the vision tower and a whole forward pass (the page's
next-token logits) with :func:`medvl.model.fused_ops.fuse_elementwise`'s plain kernels (the
eager math transformers runs) and again with its compiled ones, then with the same weights in
float32 (plain kernels) as the reference both are judged against:

- outputs: each bf16 form's relative L2 from the float32 reference (the fused kernels are right
  if they are as close to it as the eager ones: on random 7B weights bf16 rounding alone moves
  the logits by a few percent), their distance from each other, and top-token agreement;
- time: the GPU's kernel time per call (the sum of its kernels' durations, torch.profiler), which
  is what a served page costs the GPU (the server replays prefills as CUDA graphs and runs the
  tower beside the decoding steps), and the wall time between CUDA events, which here also
  counts launching every kernel from Python one call at a time (compiled functions launch more
  slowly than the eager kernels they replace); medians of ``--repeats``, compilation timed apart.

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


def gpu_ms(fn, repeats: int) -> tuple[dict[str, float], object]:
    """``fn()``'s median wall milliseconds between CUDA events and its kernels' GPU milliseconds
    per call over ``repeats`` runs, and its last output."""
    times, out = [], None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    kernel_ns = sum(e.duration_ns() for e in prof.profiler.kineto_results.events()
                    if e.device_type() == torch.autograd.DeviceType.CUDA)
    return {"kernels_ms": kernel_ns / 1e6 / repeats, "wall_ms": statistics.median(times)}, out


def run_pages(model, inputs: list, repeats: int) -> list[dict]:
    """Each page's tower output and next-token logits, and their times."""
    results = []
    with torch.inference_mode():
        for page in inputs:
            tower_ms, tower = gpu_ms(lambda page=page: model.model.get_image_features(
                page["pixel_values"], page["image_grid_thw"]).pooler_output[0], repeats)
            forward_ms, logits = gpu_ms(lambda page=page: model(**page).logits[0, -1].float(), repeats)
            results.append({"tower": tower.float().cpu(), "logits": logits.cpu(), "tower_ms": tower_ms, "forward_ms": forward_ms})
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
    model.float()  # the same weights, exactly, in float32: the reference
    fuse_elementwise(model, compiled=False)
    for page in inputs:
        page["pixel_values"] = page["pixel_values"].float()
    reference = run_pages(model, inputs, 1)
    pages = []
    for sample, page, a, b, ref in zip(samples, inputs, plain, fused, reference, strict=True):
        pages.append({"page": sample.doc_id, "tokens": int(page["input_ids"].shape[1]),
                      "logits_relative_l2_from_float32": {"plain": relative_l2(a["logits"], ref["logits"]),
                                                          "fused": relative_l2(b["logits"], ref["logits"])},
                      "tower_relative_l2_from_float32": {"plain": relative_l2(a["tower"], ref["tower"]),
                                                         "fused": relative_l2(b["tower"], ref["tower"])},
                      "logits_relative_l2_fused_from_plain": relative_l2(b["logits"], a["logits"]),
                      "same_top_token": {"plain": bool(a["logits"].argmax() == ref["logits"].argmax()),
                                         "fused": bool(b["logits"].argmax() == ref["logits"].argmax())},
                      **{key: {kind: run[key] for kind, run in (("plain", a), ("fused", b))}
                         for key in ("tower_ms", "forward_ms")}})
    median = {key: {kind: {t: statistics.median(p[key][kind][t] for p in pages) for t in ("kernels_ms", "wall_ms")}
                    for kind in ("plain", "fused")} for key in ("tower_ms", "forward_ms")}
    report = {**settings.record(("model",)), "command": shlex.join(["python", *sys.argv]),
              "device": torch.cuda.get_device_name(), "compile_s": compile_s, "pages": pages, "median": median,
              "worst_logits_relative_l2_from_float32": {
                  kind: max(p["logits_relative_l2_from_float32"][kind] for p in pages) for kind in ("plain", "fused")},
              "top_token_as_float32": {kind: sum(p["same_top_token"][kind] for p in pages) for kind in ("plain", "fused")}}
    out = Path(args.out) if args.out else wd.bench("check_fused_ops")
    atomic_write_json(out, report)
    log.info("fused elementwise, median plain -> fused: tower %s, whole forward %s; logits' worst rel. L2 from "
             "float32 %s, top token as float32's %s of %d; compile %.1f s", median["tower_ms"], median["forward_ms"],
             report["worst_logits_relative_l2_from_float32"], report["top_token_as_float32"], len(pages), compile_s)
    return report


if __name__ == "__main__":
    run_tool("check_fused_ops", (2,), main, __doc__, add_arguments)
