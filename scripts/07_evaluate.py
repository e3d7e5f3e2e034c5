#!/usr/bin/env python3
"""Phase 7: evaluate the base model (control) against the fine-tuned model, in the served form.

The adapter is merged into a full-precision base and the merged model saved; then both models
are put in the form the server serves (medvl/forms.py: on the 7b profiles the 4-bit method
phase 4 chose, AWQ int4 calibrated as phase 4 calibrated the base, or NF4; on tiny full
precision) and answer the hand-written evaluation suite and the phase-5 test split. Answers
are scored for term and value recall, precision against a medical lexicon, F1, and
per-category misses; free-text answers also with ROUGE-L. Two baselines are scored the same
way: a trivial "most common terms" answer (does the model read or only memorise?) and OCR +
rules (medvl/ocr.py: does the VLM beat a classical pipeline that costs a fraction to run?). The fine-tuned model also runs the five phase-3 documents
through the shared harness. Writes benchmarks/evaluation_finetuned.json and
benchmarks/finetuned_standard_bench.json, both naming the form evaluated.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medvl import benchmark, evaluation
from medvl.engine import PromptTooLong
from medvl.forms import FORMS, FormError, load_in_form, model_dir, profile_form
from medvl.gates import PHASES
from medvl.io import append_build_log, atomic_write_json, read_json
from medvl.modeling import load_processor
from medvl.ocr import OcrUnavailable
from medvl.phase import PhaseError, log, run_phase
from medvl.quantize import AwqUnavailable, quantize_in_form
from medvl.settings import Settings
from medvl.workdir import Workdir

PHASE = PHASES[7]


def main(settings: Settings, wd: Workdir) -> dict:
    sections = PHASE.sections
    record = settings.record(sections)
    b = settings.bench
    try:
        cases = (evaluation.suite_cases(wd.datasets / "eval_suite")
                 + evaluation.test_split_cases(wd.datasets / "formatted", b.eval_test_samples))
    except ValueError as exc:
        raise PhaseError(str(exc)) from None

    # ---- the fine-tuned model in the served form: merged in full precision, then (7b profiles)
    # quantized with phase 4's method; the control is the base model in the same form.
    merged_dir = wd.merged_model_dir(settings)
    try:
        form = profile_form(settings, wd)
        merge = evaluation.merge_adapter(wd.base_model_dir(settings), wd.adapter_dir(settings), merged_dir)
    except (FormError, evaluation.MergeError) as exc:
        raise PhaseError(str(exc)) from None
    base_dir, finetuned_dir = model_dir(settings, wd, form, False), model_dir(settings, wd, form, True)
    for stale in {wd.finetuned_awq_dir(settings), wd.finetuned_nf4_dir(settings)} - {finetuned_dir}:
        shutil.rmtree(stale, ignore_errors=True)  # never serve a stale one
    try:
        merge.update(quantize_in_form(form, merged_dir, finetuned_dir, settings))
    except AwqUnavailable as exc:  # phase 4 ran it on the base: this is a real failure
        raise PhaseError(f"AWQ of the merged model failed (phase 4's succeeded on the base): {exc}") from None

    try:  # the classical bar: OCR + rules on the same cases and scorer
        ocr_baseline = evaluation.evaluate_ocr(cases)
    except OcrUnavailable as exc:
        if settings.data.ocr_grounded_prompt:
            raise PhaseError(f"data.ocr_grounded_prompt is on but OCR cannot run: {exc}") from None
        log.warning("OCR baseline not run: %s", exc)
        ocr_baseline = {"error": str(exc)}
    if settings.data.ocr_grounded_prompt:
        cases = evaluation.ocr_grounded_cases(cases, ocr_baseline)

    def loader(folder: Path) -> Callable[[], Any]:
        return lambda: load_in_form(folder, settings, form)

    # ---- both models on the same cases
    try:
        models = {
            "base": evaluation.evaluate_model("base", loader(base_dir),
                                              load_processor(base_dir, settings), cases, b.eval_max_new_tokens,
                                              settings.decode),
            "finetuned": evaluation.evaluate_model("finetuned", loader(finetuned_dir),
                                                   load_processor(finetuned_dir, None), cases, b.eval_max_new_tokens,
                                                   settings.decode),
        }
    except PromptTooLong as exc:  # e.g. OCR-grounded prompts on a profile sized for plain ones
        raise PhaseError(f"an evaluation case does not fit: {exc}; raise decode.max_cache_len or lower "
                         "bench.eval_max_new_tokens") from None
    trivial = evaluation.score_fixed_answer(
        evaluation.most_common_answer(read_json(wd.datasets / "formatted" / "train.json")), cases)

    # ---- the fine-tuned model on the five standard documents, as phases 3 and 4 measured
    samples = benchmark.load_benchmark_samples(wd.test_images)
    standard = benchmark.benchmark_variant("finetuned", loader(finetuned_dir),
                                           load_processor(finetuned_dir, None), samples,
                                           b.max_new_tokens, b.warmup_runs, settings.decode)
    standard_record = {**record, "model_dir": str(finetuned_dir.relative_to(wd.root)), "form": FORMS[form], **standard}
    atomic_write_json(PHASE.output(wd, "finetuned_standard_bench.json"), standard_record)

    stages = {"baseline": read_json(wd.bench("baseline_fp16")), "int4": read_json(wd.bench("quantized_int4")),
              "finetuned": standard_record}
    standard_accuracy = {name: evaluation.score_standard_bench(rec, wd.test_images)["accuracy"]
                         for name, rec in stages.items()}
    result = {
        **record,
        "quality_meaningful": settings.model.source == "hub",
        "served_form": form,
        "served_form_description": FORMS[form],
        "ocr_grounded_prompt": settings.data.ocr_grounded_prompt,
        "merge": {"merge_time_s": merge["merge_time_s"], "merged_dtype": merge["merged_dtype"],
                  "targeted_weights": merge["targeted_weights"], "changed_weights": merge["changed_weights"],
                  "merged_dir": str(merged_dir.relative_to(wd.root)),
                  "served_dir": str(finetuned_dir.relative_to(wd.root)), "served_size_bytes": merge["size_bytes"],
                  "quantize_time_s": merge.get("time_s"), "awq_calibration": merge.get("calibration")},
        "cases": {"suite": sum(c.subset == "suite" for c in cases), "test": sum(c.subset == "test" for c in cases)},
        "models": models,
        "trivial_baseline": trivial,
        "ocr_baseline": ocr_baseline,
        "standard_bench_accuracy": standard_accuracy,
    }
    atomic_write_json(PHASE.output(wd, "evaluation_finetuned.json"), result)
    report(settings, wd, result, stages)
    return result


def report(settings: Settings, wd: Workdir, result: dict, stages: dict) -> None:
    """Side-by-side table and build-log entry."""
    lines = [f"{'stage':<12}{'memory MB':>11}{'p50 s':>8}{'std-doc acc':>12}"]
    for name, rec in stages.items():
        lines.append(f"{name:<12}{benchmark.headline_memory_mb(rec['load']['after_load']):>11.0f}"
                     f"{rec['aggregate']['latency_s']['p50']:>8.3f}{result['standard_bench_accuracy'][name]:>12.3f}")
    lines.append("")
    lines.append(f"{'model':<16}{'subset':<8}{'terms':>7}{'values':>8}{'acc':>7}{'prec':>7}{'F1':>7}")
    rows = [(name, m["scores"]) for name, m in result["models"].items()]
    rows.append(("trivial", result["trivial_baseline"]["scores"]))
    if "scores" in result["ocr_baseline"]:
        rows.append(("ocr + rules", result["ocr_baseline"]["scores"]))
    for name, scores in rows:
        for subset, s in scores.items():
            lines.append(f"{name:<16}{subset:<8}{s['term_recall']:>7.3f}{s['value_recall']:>8.3f}"
                         f"{s['accuracy']:>7.3f}{s['precision']:>7.3f}{s['f1']:>7.3f}")
    log.info("\n%s", "\n".join(lines))
    base, tuned = (result["models"][k]["scores"] for k in ("base", "finetuned"))
    append_build_log(wd.build_log, PHASE.number, "evaluation", [
        f"Merged the adapter into a {result['merge']['merged_dtype']} base; both models evaluated in the served "
        f"form: {result['served_form_description']}.",
        f"{result['cases']['suite']} hand-written suite documents and {result['cases']['test']} test-split samples"
        + (", each prompt OCR-grounded (the page's OCR text before the instruction)."
           if result["ocr_grounded_prompt"] else "."),
        *(f"{subset}: accuracy base {base[subset]['accuracy']:.3f} -> fine-tuned {tuned[subset]['accuracy']:.3f} "
          f"(trivial most-common-terms answer {result['trivial_baseline']['scores'][subset]['accuracy']:.3f}"
          + (f", OCR + rules {result['ocr_baseline']['scores'][subset]['accuracy']:.3f}"
             if "scores" in result["ocr_baseline"] else "") + "); "
          f"F1 {base[subset]['f1']:.3f} -> {tuned[subset]['f1']:.3f}" for subset in base),
        "Quality numbers are from a random stand-in and mean nothing about the real model."
        if not result["quality_meaningful"] else "Quality numbers are from the real model.",
        "Most missed (fine-tuned, test): " + json.dumps(tuned.get("test", {}).get("most_missed", {}))[:400],
    ])


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
