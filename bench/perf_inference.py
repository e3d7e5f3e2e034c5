#!/usr/bin/env python3
"""Decoding speed at real scale: plain transformers generate against the project's decoder.

Side by side in one run, on the phase-3 documents, at batch 1 and --batch: bitsandbytes NF4
plain ``generate`` (the seed's 4-bit serving), bf16 plain ``generate`` vs the static-cache
decoder (compiled step, fused projections), and int4 through the same decoder: round-to-nearest
at load (torchao) and phase 4's AWQ checkpoint (awq_int4: needs phase 4 to have run AWQ).
Records TTFT, decode tokens/s, latency p50/p95, peak memory, compile time, the share of the
memory-bandwidth floor (copy bandwidth measured in the same run) and a next-token-logits
check against plain generate on the same weights. Needs a CUDA GPU; run on 7b-random for real-scale figures:

    python bench/perf_inference.py --profile 7b-random

Writes benchmarks/perf_inference.json.
"""

import argparse
import shlex
import sys

import torch
from perf import INFERENCE_VARIANTS, inference_report

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.evaluation.benchmark import ensure_benchmark_documents
from medvl.pipeline.runner import PhaseError, log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per row (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="the batch size besides 1 (default: %(default)s; 1: batch 1 only)")
    parser.add_argument("--variants", default=",".join(INFERENCE_VARIANTS),
                        help="which to measure, comma-separated (default: %(default)s); the summary "
                        "covers those measured")


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise PhaseError("perf_inference measures GPU decoding and needs a CUDA GPU")
    header = {**settings.record(("model", "decode")), "command": shlex.join(["python", *sys.argv])}

    def save(report: dict) -> None:
        atomic_write_json(wd.bench("perf_inference"), {**header, **report})

    # Phase 3's documents (written here the same way if phase 3 has not run).
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    variants = tuple(args.variants.split(","))
    unknown = set(variants) - set(INFERENCE_VARIANTS)
    if unknown:
        raise PhaseError(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(INFERENCE_VARIANTS)}")
    awq_dir = wd.awq_model_dir(settings)
    if "awq_int4" in variants and not (awq_dir / "config.json").is_file():
        raise PhaseError(f"awq_int4 needs phase 4's AWQ checkpoint ({awq_dir}); run phase 4 (AWQ) first")
    report = inference_report(wd.base_model_dir(settings), settings, samples, max_new_tokens=args.new_tokens,
                              batch_sizes=tuple(dict.fromkeys((1, args.batch))), variants=variants,
                              awq_dir=awq_dir, save=save)
    save(report)
    log.info("summary: %s", report.get("summary", "(not all variants measured)"))
    return report


if __name__ == "__main__":
    run_tool("perf_inference", (2,), main, __doc__, add_arguments)
