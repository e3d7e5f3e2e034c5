#!/usr/bin/env python3
"""QLoRA training speed at real scale: plain PEFT against the project's training path.

Side by side in one run, on the phase-5 training rows (full-page documents, the profile's
max length): plain PEFT QLoRA (``prepare_model_for_kbit_training``, full causal-LM loss)
vs ``medvl.training.trainer`` (frozen weights kept bf16, answer-only logits), padded and packed
(``train.pack_samples``: each batch's samples in one row, no padding), each at batch 1, 2, 4, ...
until memory runs out, on the same samples in the same order (the per-step losses compare). Records seconds per step, tokens/s and peak memory. Needs a
CUDA GPU; run on 7b-random for real-scale figures:

    python bench/perf_training.py --profile 7b-random

Writes benchmarks/perf_training.json.
"""

import argparse
import shlex
import sys

import torch
from perf import training_report

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.pipeline.runner import PhaseError, log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,2,4,8", help="batch sizes to try, in order (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per batch size (default: %(default)s)")


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise PhaseError("perf_training measures GPU training and needs a CUDA GPU")
    sizes = tuple(int(b) for b in args.batches.split(","))
    report = training_report(wd.base_model_dir(settings), wd.datasets / "formatted", settings,
                             batch_sizes=sizes, steps=args.steps)
    record = {**settings.record(("model", "train")), "command": shlex.join(["python", *sys.argv]), **report}
    atomic_write_json(wd.bench("perf_training"), record)
    log.info("summary: %s", report["summary"])
    return record


if __name__ == "__main__":
    run_tool("perf_training", (2, 5), main, __doc__, add_arguments)
