#!/usr/bin/env python3
"""How many training samples a profile drops for not fitting ``train.max_length``, counted with
the stand-in's tokenizer built as phase 2 builds it, without building its weights.

Phase 5 drops (never cuts) every sample whose prompt, page image and answer exceed
``train.max_length`` and fails when more than ``data.max_too_long_fraction`` go. This runs the
same collection, de-duplication and count (``medvl.training.data.drop_too_long``) on a CPU, so the
profile's limit can be set from a measurement for each tokenizer:

    python bench/count_dropped.py --profile 7b-random --out docs/results/cpu/dropped_7b_random.json
    python bench/count_dropped.py --profile 7b-random \
        --set model.standin_tokenizer=trained --set model.standin_tokenizer_vocab=8192

Needs no earlier phase (the synthetic documents are generated; hub sources are tried as
phase 5 tries them).
"""

import argparse
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.model import standin
from medvl.model.loading import load_processor
from medvl.pipeline.runner import PhaseError, log, run_tool
from medvl.training import data


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/dropped_<profile>.json)")


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    m = settings.model
    if m.source != "standin":
        raise PhaseError("counts with a stand-in's tokenizer; this profile loads the hub model")
    kind = m.standin_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        processor_dir, raw_dir = Path(tmp) / "processor", Path(tmp) / "raw"
        standin.build_processor(kind, m.standin_tokenizer_vocab, m.min_pixels,
                                m.max_pixels).save_pretrained(processor_dir)
        samples, _ = data.collect_samples(settings, raw_dir)
        kept = data.deduplicate(samples, data.protected_hashes(settings), Counter())
        _, lengths = data.drop_too_long(kept, load_processor(processor_dir, settings),
                                        settings.train.max_length)
    result = {"command": shlex.join(["python", *sys.argv]), "profile": settings.profile,
              "tokenizer": kind, "tokenizer_vocab": m.standin_tokenizer_vocab if kind == "trained" else None,
              "max_pixels": m.max_pixels, "max_too_long_fraction": settings.data.max_too_long_fraction,
              **lengths}
    out = args.out or wd.benchmarks / f"dropped_{settings.profile}.json"
    atomic_write_json(out, result)
    log.info("%s tokenizer: %d of %d samples over %d tokens (%.1f%%; the profile allows %.0f%%) -> %s",
             kind, lengths["too_long"], lengths["samples_checked"], settings.train.max_length,
             100 * lengths["too_long_fraction"], 100 * settings.data.max_too_long_fraction, out)
    return result


if __name__ == "__main__":
    run_tool("count_dropped", (), main, __doc__, add_arguments)
