#!/usr/bin/env python3
"""The OCR-grounded prompt, measured: train and evaluate again with each page's OCR text in
its prompt, and compare with the run that read pages from pixels alone.

    python bench/ocr_grounded_prompt.py [--profile tiny] [--workdir WD] [--grounded-workdir DIR]
                                        [--grounded-set decode.max_cache_len=2048 ...]

WD holds a finished run with plain prompts (phases 1-7). Its phase 1-4 outputs are copied into
DIR (default WD/experiments/ocr_grounded), where run_pipeline.sh runs each of phases 1-7 whose
gate fails there with ``--set data.ocr_grounded_prompt=true`` and any ``--grounded-set`` (so a
finished DIR is reused as it is). The OCR text lengthens every prompt (tiny: 515 -> 710 tokens per training
sample, p50; the suite's grounded prompts up to 673), so on tiny the evaluation's 400-token
answers need ``--grounded-set decode.max_cache_len=2048``; phases 3-4 rerun there for it.
Both runs' phase-7 results are then compared on the same scorer: base, fine-tuned and the
baselines per subset, each figure with its 95% interval, and the verdicts from the intervals of
paired differences (grounded vs plain, grounded vs the most common answer and OCR + rules), with
training loss, prompt length and latency. Writes
WD/benchmarks/ocr_grounded_prompt.json; phase 9's report shows it. On tiny, about 25 minutes
on a 2-core CPU (OCR of ~300 pages, training, evaluation).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from variant_run import variant_run

from medvl.core.io import atomic_write_json, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.evaluation import scoring
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_tool

GROUNDED = "data.ocr_grounded_prompt=true"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grounded-workdir", default=None,
                        help="where the grounded run goes (default: WORKDIR/experiments/ocr_grounded)")
    parser.add_argument("--grounded-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another override for the grounded run only, e.g. decode.max_cache_len=2048")


def grounded_run(settings: Settings, wd: Workdir, folder: Path, extra: list[str]) -> Workdir:
    """Phases 5-7 with OCR-grounded prompts (and ``extra`` overrides) in ``folder``, on a copy of
    phases 1-4 of ``wd``."""
    return variant_run(settings, wd, folder, [GROUNDED, *extra])


def scores(evaluation: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per subset: base, fine-tuned and the baselines' headline figures, each with its interval."""
    named = {**evaluation["models"], **evaluation["baselines"]}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, source in named.items():
        for subset, group in source["scores"]["subsets"].items():
            out.setdefault(subset, {})[name] = scoring.headline(group)
    return out


def run_summary(wd: Workdir) -> dict[str, Any]:
    evaluation = read_json(wd.bench("evaluation_finetuned"))
    training = read_json(wd.bench("training_metrics"))
    data = read_json(wd.datasets / "formatted" / "data_summary.json")
    return {"workdir": str(wd.root), "ocr_grounded_prompt": evaluation["ocr_grounded_prompt"],
            "scores": scores(evaluation), "cases": evaluation["cases"],
            "training": {"final_loss": training.get("final_loss"), "initial_loss": training.get("initial_loss"),
                         "train_time_s": training.get("train_time_s"), "samples": data["counts"]},
            "tokens_per_training_sample_p50": data["length_check"]["tokens"]["p50"],
            "too_long_dropped": data["length_check"]["too_long"],
            "finetuned_latency_p50_s": evaluation["models"]["finetuned"]["latency_s"]["p50"],
            "ocr_latency_p50_s": ((evaluation["baselines"].get("ocr_rules") or {}).get("latency_s") or {}).get("p50")}


def verdict(grounded: Workdir, plain: Workdir) -> dict[str, Any]:
    """On the held-out test split, each from the 95% interval of a paired difference: grounded
    against plain prompts (the same test cases in both runs), and the grounded fine-tuned model
    against the most common answer and OCR + rules (from the grounded run's phase 7)."""
    ev_grounded, ev_plain = (read_json(wd.bench("evaluation_finetuned")) for wd in (grounded, plain))
    versus_plain = scoring.compare(ev_grounded["models"]["finetuned"]["scores"], ev_plain["models"]["finetuned"]["scores"])
    comparisons = ev_grounded["comparisons"]
    return {"grounded_vs_plain": versus_plain["subsets"].get("test", {}),
            **{f"grounded_vs_{name}": comparisons[f"finetuned_vs_{name}"]["subsets"].get("test", {})
               for name in ("most_common", "ocr_rules") if f"finetuned_vs_{name}" in comparisons}}


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> None:
    if settings.data.ocr_grounded_prompt:
        raise PhaseError("--workdir must hold the run with plain prompts (data.ocr_grounded_prompt off)")
    folder = Path(args.grounded_workdir) if args.grounded_workdir else wd.root / "experiments" / "ocr_grounded"
    grounded_wd = grounded_run(settings, wd, folder.resolve(), args.grounded_set)
    result = {**settings.record(PHASES[7].sections), "plain": run_summary(wd), "grounded": run_summary(grounded_wd),
              "verdict": verdict(grounded_wd, wd),
              "grounded_overrides": [GROUNDED, *args.grounded_set],
              "note": "scores compare (same cases, scorer and splits); latencies do not: each comes from its "
                      "own run's phase 7, and runs made at different times on a shared machine see other loads",
              "command": " ".join(["python bench/ocr_grounded_prompt.py --profile", settings.profile,
                                   *(f"--grounded-set {item}" for item in args.grounded_set)])}
    atomic_write_json(wd.bench("ocr_grounded_prompt"), result)
    for name, metrics in result["verdict"].items():
        for metric, d in metrics.items():
            log.info("test split, %s: %s %+.3f [%+.3f, %+.3f] -> %s", name, metric, d["difference"], *d["ci95"],
                     d["verdict"])


if __name__ == "__main__":
    run_tool("ocr_grounded_prompt", (7,), main, __doc__, add_arguments)
