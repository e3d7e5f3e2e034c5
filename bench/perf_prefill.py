#!/usr/bin/env python3
"""Where a page's prefill time goes: the processor, the vision tower, the M-RoPE positions and
the language model, per batch size, with the vision tower's windows batched (medvl.model.vision) and
as transformers runs them (one SDPA call per window), and (``--vision ...,batched_compiled``)
with the batched blocks under ``torch.compile`` (dynamic shapes; its compile time recorded). GPU times from CUDA events, host times
from the wall clock; then a profiler table of one batch-8 prefill.

    python bench/perf_prefill.py --profile 7b-random

Writes benchmarks/perf_prefill.json. Needs a CUDA GPU.
"""

import argparse
import shlex
import sys
import time
from dataclasses import replace

import torch
from PIL import Image

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.engine.loader import build_engine
from medvl.engine.slot_cache import generation_position_ids
from medvl.evaluation.benchmark import ensure_benchmark_documents
from medvl.model.loading import load_model, load_processor
from medvl.model.vision import batch_window_attention
from medvl.pipeline.runner import PhaseError, log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,4,8", help="prefill batch sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vision", default="per_window,batched",
                        help="vision tower variants, in order, of per_window, batched, batched_compiled "
                             "(the blocks under torch.compile; after batched) (default: %(default)s)")


def gpu_ms(fn, repeats: int) -> tuple[float, float]:
    """(GPU ms by CUDA events, host wall ms) of ``fn``, best of ``repeats`` after one warm-up."""
    fn()
    best_gpu, best_wall = float("inf"), float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        wall = time.perf_counter()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        best_wall = min(best_wall, (time.perf_counter() - wall) * 1000)
        best_gpu = min(best_gpu, start.elapsed_time(end))
    return best_gpu, best_wall


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise PhaseError("needs a CUDA GPU")
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    model_dir = wd.base_model_dir(settings)
    processor = load_processor(model_dir, None, padding_side="left")
    model = load_model(model_dir, settings, batched_vision=False)
    # the vision tower timed apart, and inside the prefill as before (not at preparation)
    engine = build_engine(model, processor, replace(settings.decode, vision_in_prepare=False), slots=8,
                          compile_step=False)
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    report = {"command": shlex.join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0), "rows": []}
    started = time.perf_counter()
    prompts = [engine.prepare(images[i % len(images)], samples[i % len(samples)].prompt) for i in range(8)]
    report["processor_ms_per_page"] = (time.perf_counter() - started) * 1000 / 8
    visual = model.model.visual
    for vision in args.vision.split(","):
        if vision == "batched":
            batch_window_attention(model)
        if vision == "batched_compiled":  # an experiment (issue 32): the blocks compiled, shapes dynamic
            compile_started = time.perf_counter()
            for block in visual.blocks:
                block.forward = torch.compile(block.forward, dynamic=True)
            with torch.inference_mode():
                first = engine.collate(prompts[:1])
                visual(first["pixel_values"].to(visual.dtype), grid_thw=first["image_grid_thw"])
                torch.cuda.synchronize()
            report["vision_compile_s"] = time.perf_counter() - compile_started
        for b in (int(x) for x in args.batches.split(",")):
            inputs = engine.collate(prompts[:b])
            row = {"vision": vision, "batch": b, "tokens": int(inputs["input_ids"].numel())}
            with torch.inference_mode():
                row["collate_ms"] = gpu_ms(lambda b=b: engine.collate(prompts[:b]), args.repeats)
                row["vision_tower_ms"] = gpu_ms(lambda inputs=inputs: visual(
                    inputs["pixel_values"].to(visual.dtype), grid_thw=inputs["image_grid_thw"]), args.repeats)
                row["positions_ms"] = gpu_ms(lambda inputs=inputs: generation_position_ids(model, inputs), args.repeats)
                row["prefill_ms"] = gpu_ms(lambda inputs=inputs, b=b: engine.decoder.prefill_batch(inputs, 0),
                                           args.repeats)
            row["prefill_ms_per_page"] = row["prefill_ms"][0] / b
            report["rows"].append(row)
            log.info("%s", row)
            atomic_write_json(wd.bench("perf_prefill"), report)
    inputs = engine.collate(prompts[:8])
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.decoder.prefill_batch(inputs, 0)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    log.info("\n%s\n%s", table, cpu_table)
    report["profile_batch_8"] = table.splitlines()
    report["profile_batch_8_cpu"] = cpu_table.splitlines()
    atomic_write_json(wd.bench("perf_prefill"), report)
    return report


if __name__ == "__main__":
    run_tool("perf_prefill", (2,), main, __doc__, add_arguments)
