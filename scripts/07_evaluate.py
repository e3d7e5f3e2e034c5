#!/usr/bin/env python3
"""Phase 7: evaluate the base model (control) against the fine-tuned model, in the served form.

The adapter is merged into a full-precision base and the merged model saved; then both models
are put in the form the server serves (medvl/model/forms.py: on the 7b profiles the 4-bit method
phase 4 chose, AWQ int4 calibrated as phase 4 calibrated the base, or NF4; on tiny full
precision) and answer the hand-written evaluation suite and the phase-5 test split. The cases
go to benchmarks/eval_cases.jsonl and each model's answers to eval_answers_<model>.jsonl; the
answers are scored by medvl/evaluation/scoring.py, the function `medvl-score` runs: records field by field
(a medication right only with its own dose, route and frequency), free text by ROUGE-L, each
figure with a bootstrap 95% interval, per subset and per source. Three baselines bound the
scale: the empty record, the most common training answer, and OCR + rules (medvl/medical/ocr.py).
Fine-tuned minus base is a paired bootstrap; its interval gives the verdict, and the gate fails
only when the fine-tuned model is significantly worse on the held-out test split. Where the
served form is 4-bit, the merged model is also scored in full precision on the same cases, so
the cost of 4 bits is measured. The fine-tuned model also runs the five phase-3 documents
through the shared harness. Writes benchmarks/evaluation_finetuned.json and
benchmarks/finetuned_standard_bench.json, both naming the form evaluated.
"""

import json
import shutil
from collections import Counter

from medvl.core.io import append_build_log, atomic_write_json, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.engine.pages import PageLimits
from medvl.engine.scheduler import PromptTooLong
from medvl.evaluation import benchmark, evaluate, scoring
from medvl.medical import ocr
from medvl.medical.ocr import OcrUnavailable
from medvl.model import memory
from medvl.model.forms import FORMS, FormError, load_in_form, model_dir, profile_form
from medvl.model.loading import load_processor
from medvl.model.quantize import AwqUnavailable, quantize_in_form
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase

PHASE = PHASES[7]


def main(settings: Settings, wd: Workdir) -> dict:
    sections = PHASE.sections
    record = settings.record(sections)
    b = settings.bench
    pdf_limits = PageLimits.from_settings(settings.api)  # the multi-page case, rendered as the server would
    ocr.use_backend(settings.api.ocr_backend)  # pages read as the server reads them (grounding, baseline)
    cases = (evaluate.suite_cases(wd.datasets / "eval_suite", wd.root)
             + evaluate.test_split_cases(wd.datasets / "formatted", wd.root, b.eval_test_samples))

    # ---- the fine-tuned model in the served form: merged in full precision, then (7b profiles)
    # quantized with phase 4's method; the control is the base model in the same form.
    merged_dir = wd.merged_model_dir(settings)
    try:
        form = profile_form(settings, wd)
        merge = evaluate.merge_adapter(wd.base_model_dir(settings), wd.adapter_dir(settings), merged_dir)
    except (FormError, evaluate.MergeError) as exc:
        raise PhaseError(str(exc)) from None
    base_dir, finetuned_dir = model_dir(settings, wd, form, False), model_dir(settings, wd, form, True)
    for stale in {wd.finetuned_awq_dir(settings), wd.finetuned_nf4_dir(settings)} - {finetuned_dir}:
        shutil.rmtree(stale, ignore_errors=True)  # never serve a stale one
    try:
        merge.update(quantize_in_form(form, merged_dir, finetuned_dir, settings))
    except AwqUnavailable as exc:  # phase 4 ran it on the base: this is a real failure
        raise PhaseError(f"AWQ of the merged model failed (phase 4's succeeded on the base): {exc}") from None

    try:  # the classical bar: OCR + rules on the same cases and scorer
        ocr_baseline = evaluate.evaluate_ocr(cases, wd.root, pdf_limits)
    except OcrUnavailable as exc:
        if settings.data.ocr_grounded_prompt:
            raise PhaseError(f"data.ocr_grounded_prompt is on but OCR cannot run: {exc}") from None
        log.warning("OCR baseline not run: %s", exc)
        ocr_baseline = {"error": str(exc)}
    if settings.data.ocr_grounded_prompt:
        cases = evaluate.ocr_grounded_cases(cases, ocr_baseline)
    evaluate.write_cases(PHASE.output(wd, "eval_cases.jsonl"), cases)

    # ---- both models on the same cases (and, where the served form is 4-bit, the merged model
    # in full precision: what 4 bits cost the fine-tune)
    runs = {"base": (base_dir, form), "finetuned": (finetuned_dir, form)}
    if form != "bf16":
        runs["finetuned_bf16"] = (merged_dir, "bf16")
    for also in b.also_forms():  # what another form would cost the fine-tune (bench.eval_also_forms)
        runs[f"finetuned_{also}"] = (merged_dir, also)
    models = {}
    for name, (folder, in_form) in runs.items():
        try:
            models[name] = evaluate.evaluate_model(
                name, lambda f=folder, i=in_form: load_in_form(f, settings, i),
                load_processor(folder, settings if name == "base" else None), cases, wd.root,
                b.eval_max_new_tokens, settings.decode, pdf_limits, settings.data.ocr_grounded_prompt,
                settings.api.review_below_confidence, b.eval_concurrency)
        except PromptTooLong as exc:  # e.g. OCR-grounded prompts on a profile sized for plain ones
            raise PhaseError(f"an evaluation case does not fit: {exc}; raise decode.max_cache_len or lower "
                             "bench.eval_max_new_tokens") from None
        evaluate.write_answers(wd.benchmarks / f"eval_answers_{name}.jsonl",
                                 evaluate.answers_of(models[name]["cases"]))
    train_rows = read_json(wd.datasets / "formatted" / "train.json")
    baselines = {"empty_record": evaluate.score_baseline("empty_record", evaluate.empty_record_answers(cases), cases),
                 "most_common": evaluate.score_baseline(
                     "most_common", evaluate.most_common_answers(train_rows, cases), cases)}
    if "scores" in ocr_baseline:
        baselines["ocr_rules"] = ocr_baseline
    scores = {name: m["scores"] for name, m in models.items()} | {name: v["scores"] for name, v in baselines.items()}
    comparisons = {"finetuned_vs_base": scoring.compare(scores["finetuned"], scores["base"]),
                   **{f"finetuned_vs_{name}": scoring.compare(scores["finetuned"], scores[name]) for name in baselines}}
    if "finetuned_bf16" in models:
        comparisons["finetuned_vs_finetuned_bf16"] = scoring.compare(scores["finetuned"], scores["finetuned_bf16"])
    reference = "finetuned_bf16" if "finetuned_bf16" in models else "finetuned"
    for also in b.also_forms():
        comparisons[f"finetuned_{also}_vs_finetuned_bf16"] = scoring.compare(scores[f"finetuned_{also}"],
                                                                           scores[reference])

    # ---- the fine-tuned model on the five standard documents, as phases 3 and 4 measured
    samples = benchmark.load_benchmark_samples(wd.test_images)
    standard = benchmark.benchmark_variant("finetuned", lambda: load_in_form(finetuned_dir, settings, form),
                                           load_processor(finetuned_dir, None), samples,
                                           b.max_new_tokens, b.warmup_runs, settings.decode,
                                           benchmark.load_benchmark_pdfs(wd.test_images), pdf_limits)
    standard_record = {**record, "model_dir": str(finetuned_dir.relative_to(wd.root)), "form": FORMS[form], **standard}
    atomic_write_json(PHASE.output(wd, "finetuned_standard_bench.json"), standard_record)

    stages = {"baseline": read_json(wd.bench("baseline_fp16")), "int4": read_json(wd.bench("quantized_int4")),
              "finetuned": standard_record}
    standard_f1 = {name: evaluate.score_standard_bench(rec, wd.test_images)["f1"]["value"]
                   for name, rec in stages.items()}
    result = {
        **record,
        "quality_meaningful": settings.model.source == "hub",
        "quality_kind": evaluate.quality_kind(settings),
        "served_form": form,
        "served_form_description": FORMS[form],
        "ocr_grounded_prompt": settings.data.ocr_grounded_prompt,
        "merge": {"merge_time_s": merge["merge_time_s"], "merged_dtype": merge["merged_dtype"],
                  "targeted_weights": merge["targeted_weights"], "changed_weights": merge["changed_weights"],
                  "merged_dir": str(merged_dir.relative_to(wd.root)),
                  "served_dir": str(finetuned_dir.relative_to(wd.root)), "served_size_bytes": merge["size_bytes"],
                  "quantize_time_s": merge.get("time_s"), "awq_calibration": merge.get("calibration")},
        "cases": {"suite": sum(c.subset == "suite" for c in cases), "test": sum(c.subset == "test" for c in cases),
                  "by_source": dict(Counter(c.source for c in cases)), "file": "benchmarks/eval_cases.jsonl"},
        "models": models,
        "baselines": baselines,
        "ocr_error": ocr_baseline.get("error"),
        "comparisons": comparisons,
        "standard_bench_f1": standard_f1,
    }
    atomic_write_json(PHASE.output(wd, "evaluation_finetuned.json"), result)
    report(wd, result, stages)
    return result


def _figure(group: dict, kind: str, metric: str) -> str:
    block = group.get(kind) or {}
    if not block.get("cases"):
        return "-"
    value = block[metric]
    return f"{value['value']:.3f} [{value['ci95'][0]:.3f}, {value['ci95'][1]:.3f}]"


def report(wd: Workdir, result: dict, stages: dict) -> None:
    """Side-by-side table and build-log entry: every figure with its interval, each verdict
    from the interval of the paired difference."""
    lines = [f"{'stage':<12}{'memory MB':>11}{'p50 s':>8}{'std-doc F1':>12}"]
    for name, rec in stages.items():
        lines.append(f"{name:<12}{memory.headline_memory_mb(rec['load']['after_load']):>11.0f}"
                     f"{rec['aggregate']['latency_s']['p50']:>8.3f}{result['standard_bench_f1'][name]:>12.3f}")
    lines += ["", f"{'source':<14}{'model':<16}{'extraction F1 [95% CI]':<26}{'ROUGE-L [95% CI]':<26}"]
    named = {**result["models"], **result["baselines"]}
    for source in result["models"]["finetuned"]["scores"]["sources"]:
        for name, m in named.items():
            group = m["scores"]["sources"][source]
            lines.append(f"{source:<14}{name:<16}{_figure(group, 'extraction', 'f1'):<26}"
                         f"{_figure(group, 'free_text', 'rouge_l'):<26}")
    log.info("\n%s", "\n".join(lines))
    verdicts = [f"{key} {group}: {metric} {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] -> "
                f"{d['verdict']}"
                for key in ("subsets", "sources")
                for group, metrics in result["comparisons"]["finetuned_vs_base"][key].items()
                for metric, d in metrics.items()]
    append_build_log(wd.build_log, PHASE.number, "evaluation", [
        f"Merged the adapter into a {result['merge']['merged_dtype']} base; both models evaluated in the served "
        f"form: {result['served_form_description']}.",
        f"{result['cases']['suite']} hand-written suite documents and {result['cases']['test']} test-split samples "
        f"(by source {json.dumps(result['cases']['by_source'])}), written to {result['cases']['file']}"
        + (", each prompt OCR-grounded (the page's OCR text before the instruction)."
           if result["ocr_grounded_prompt"] else "."),
        "Fine-tuned minus base (paired bootstrap, 95% interval): " + "; ".join(verdicts) + ".",
        evaluate.QUALITY_WORDS[result["quality_kind"]],
        "Most missed (fine-tuned, test): "
        + json.dumps(result["models"]["finetuned"]["scores"]["subsets"].get("test", {}).get("extraction", {})
                     .get("most_missed", []))[:400],
    ])


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
