#!/usr/bin/env python3
"""Score the merged fine-tuned model (bf16) on the first N test-split pages, fast.

Why: phase 7 scores three models and baselines; when a GPU lease is nearly spent, this answers
the one question that decides what to change next (did fine-tuning teach the record?) in about
a minute, through the same engine, cases and scorer as phase 7 (medvl.evaluation.evaluate).
Needs phase 7 to have merged the adapter (models/<slug>-medical-merged/).

    python bench/eval_merged.py --profile small --workdir /tmp/run-small --cases 40 --out quick.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medvl.core.io import atomic_write_json
from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir
from medvl.engine.pages import PageLimits
from medvl.evaluation import evaluate
from medvl.model.forms import load_in_form
from medvl.model.loading import load_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--set", action="append", default=[], metavar="K=V", help="a setting, as the phases take it")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--cases", type=int, default=40, help="test-split pages scored (their first N)")
    parser.add_argument("--out", type=Path, required=True, help="JSON written here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings(args.profile, args.set)
    wd = Workdir.at(args.workdir)
    merged = wd.merged_model_dir(settings)
    if not merged.is_dir():
        parser.error(f"{merged} does not exist: phase 7 merges the adapter first")
    cases = evaluate.test_split_cases(wd.datasets / "formatted", wd.root, args.cases)
    result = evaluate.evaluate_model(
        "finetuned_bf16", lambda: load_in_form(merged, settings, "bf16"), load_processor(merged, None), cases,
        wd.root, settings.bench.eval_max_new_tokens, settings.decode, PageLimits.from_settings(settings.api),
        settings.data.ocr_grounded_prompt, settings.api.review_below_confidence, settings.bench.eval_concurrency)
    out = {"profile": args.profile, "model_dir": str(merged), "cases": len(cases),
           "scores": result["scores"]["subsets"]["test"], "calibration": result["calibration"],
           "answers": [row["response"] for row in result["cases"][:3]]}
    atomic_write_json(args.out, out)
    f1 = out["scores"]["extraction"]["f1"]
    logging.info("test F1 %.3f [%.3f, %.3f] over %d pages; ECE %s", f1["value"], *f1["ci95"], len(cases),
                 out["calibration"]["expected_calibration_error"])
    print(json.dumps(f1))


if __name__ == "__main__":
    main()
