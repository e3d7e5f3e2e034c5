"""Phase 9: the report, written from the benchmark files alone.

Every number in FINAL_REPORT.json, BENCHMARK_REPORT.md, the charts, the content draft and
the README table is read from a JSON that an earlier phase wrote; a phase that has not run
is reported as missing, never filled in. Findings are sentences computed from the numbers,
so they cannot claim what the numbers do not show.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medvl.core.environment import hardware_label  # noqa: E402
from medvl.core.workdir import REPO_ROOT  # noqa: E402
from medvl.evaluation.scoring import headline  # noqa: E402
from medvl.model.memory import headline_memory_mb  # noqa: E402

# Besides the phases' own benchmark JSONs (the caller names them from the phase registry), the
# report reads the runs of the tools in bench/ that write into the run.
TOOL_OUTPUTS = ["reliability", "ocr_grounded_prompt"]
# The OCR-grounded prompt experiment as measured and committed (bench/ocr_grounded_prompt.py on
# the tiny profile): the report quotes it, labelled, for a run of that profile without its own.
COMMITTED_OCR_GROUNDED = REPO_ROOT / "docs" / "results" / "cpu" / "ocr_grounded_prompt.json"
STAGES = [("Baseline", "baseline_fp16"), ("INT4 quantized", "quantized_int4"),
          ("Fine-tuned", "finetuned_standard_bench")]
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


def load_benchmarks(folder: Path, phase_outputs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Every benchmark JSON named (``phase_outputs``: phases 1-8's, from the registry; and
    :data:`TOOL_OUTPUTS`) that exists and parses; the names of those that do not."""
    found, missing = {}, []
    for name in [*phase_outputs, *TOOL_OUTPUTS]:
        path = folder / f"{name}.json"
        try:
            found[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            missing.append(name)
    return found, missing


def _round(value: Any, digits: int = 3) -> Any:
    return round(value, digits) if isinstance(value, (int, float)) else None


def stage_table(b: dict[str, Any]) -> list[dict[str, Any]]:
    """FP16 -> INT4 -> fine-tuned, with what each JSON says (None where a phase is missing)."""
    sizes = {
        "baseline_fp16": (b.get("quantization_info") or {}).get("size_on_disk_bytes", {}).get("baseline")
        or (b.get("model_download") or {}).get("size_bytes"),
        "quantized_int4": (b.get("quantization_info") or {}).get("size_on_disk_bytes", {}).get("quantized"),
        "finetuned_standard_bench": (b.get("evaluation_finetuned") or {}).get("merge", {}).get("served_size_bytes"),
    }
    standard_f1 = (b.get("evaluation_finetuned") or {}).get("standard_bench_f1", {})
    acc_key = {"baseline_fp16": "baseline", "quantized_int4": "int4", "finetuned_standard_bench": "finetuned"}
    rows = []
    for label, key in STAGES:
        rec = b.get(key)
        if not rec:
            rows.append({"stage": label, "source": f"{key}.json", "missing": True})
            continue
        agg = rec["aggregate"]
        rows.append({
            "stage": label, "source": f"{key}.json", "missing": False,
            "memory_mb": _round(headline_memory_mb(rec["load"]["after_load"]), 1),
            "weights_mb": _round(rec["load"].get("weights_footprint_mb"), 2),
            "peak_memory_mb": _round(rec["peak_memory_mb"], 1),
            "load_time_s": _round(rec["load"]["load_time_s"], 2),
            "latency_p50_s": _round(agg["latency_s"]["p50"]),
            "latency_p95_s": _round(agg["latency_s"]["p95"]),
            "ttft_s": _round(agg["ttft_s"]["avg"]),
            "tokens_per_s": _round(agg["tokens_per_s"]["avg"], 1),
            "size_gb": _round(sizes[key] / 1e9, 3) if sizes.get(key) else None,
            "f1": _round(standard_f1.get(acc_key[key])),
        })
    return rows


def build_final_report(b: dict[str, Any], missing: list[str]) -> dict[str, Any]:
    env = b.get("environment") or {}
    train = b.get("training_metrics") or {}
    quant = b.get("quantization_info") or {}
    ev = b.get("evaluation_finetuned") or {}
    api = b.get("api_validation") or {}
    profile = next((r.get("profile") for r in b.values() if isinstance(r, dict) and r.get("profile")), None)
    return {
        "pipeline": "Qwen2.5-VL-7B-Instruct -> 4-bit quantization -> QLoRA fine-tuning for medical documents "
                    "-> evaluation -> API",
        "profile": profile,
        "quality_meaningful": bool(ev.get("quality_meaningful")) if ev else None,
        "quality_kind": ev.get("quality_kind") if ev else None,
        "missing": missing,
        "environment": {
            "hardware": hardware_label(env) if env else None,
            # torch's CUDA build is reported only when a GPU was actually used.
            "cuda": (env.get("cuda") or {}).get("torch_cuda") if (env.get("cuda") or {}).get("available") else None,
            "python": (env.get("python") or {}).get("version") if env else None,
            "pytorch": (env.get("packages") or {}).get("torch") if env else None,
            "transformers": (env.get("packages") or {}).get("transformers") if env else None,
        },
        "stages": stage_table(b),
        "training": {k: train.get(k) for k in ("train_time_s", "initial_loss", "final_loss", "global_step", "epochs",
                                               "trainable_params", "total_params", "trainable_pct", "training_samples",
                                               "reviewed_training", "steady_state", "whole_run", "warmup", "evaluation",
                                               "checkpoint_saving", "length_check", "peak_memory_mb", "lora")}
                     if train else None,
        "loss_curve": train.get("loss_curve", []),
        "quantization": {k: quant.get(k) for k in ("method", "awq_error", "memory_reduction_pct", "size_reduction_pct",
                                                   "latency_change_pct", "quantize_time_s", "served_form")}
                        | {"logits_vs_full_precision": {name: _round(rec.get("relative_l2_mean")) for name, rec in
                                                        (quant.get("logits_vs_full_precision") or {}).items()
                                                        if "relative_l2_mean" in rec}} if quant else None,
        "evaluation": evaluation_section(ev) if ev.get("models") else None,
        "flagged_items": (ev.get("models", {}).get("finetuned") or {}).get("flagged_items"),
        "decoding": (ev.get("models", {}).get("finetuned") or {}).get("decoding"),
        "api_validation": {"all_ok": api.get("all_ok"),
                           "endpoints": {k: {"ok": v.get("ok"), "status": v.get("status"),
                                             "latency_s": _round(v.get("latency_s"))}
                                         for k, v in (api.get("endpoints") or {}).items()}} if api else None,
        "reliability": b.get("reliability"),
        "ocr_grounded_prompt": ocr_grounded_experiment(b.get("ocr_grounded_prompt"), profile),
    }


def evaluation_section(ev: dict[str, Any]) -> dict[str, Any]:
    """Phase 7's figures as the report shows them: per subset and per source, every model and
    baseline's headline figures with their 95% intervals, and the verdicts of the paired
    differences (fine-tuned vs base, vs each baseline, vs its own full-precision form)."""
    named = {**ev["models"], **ev.get("baselines", {})}
    groups = {key: {group: {name: {"cases": m["scores"][key][group]["cases"], **headline(m["scores"][key][group])}
                            for name, m in named.items()}
                    for group in ev["models"]["finetuned"]["scores"][key]}
              for key in ("subsets", "sources")}
    tuned_test = ev["models"]["finetuned"]["scores"]["subsets"].get("test", {}).get("extraction", {})
    ocr = ev.get("baselines", {}).get("ocr_rules") or {}
    return {"served_form": ev.get("served_form_description"), **groups,
            "comparisons": ev.get("comparisons", {}),
            "finetuned_test_fields": tuned_test.get("fields"), "finetuned_test_by_type": tuned_test.get("by_type"),
            "ocr_rules": {"engine": ocr.get("engine"), "error": ev.get("ocr_error"),
                          "latency_p50_s": _round((ocr.get("latency_s") or {}).get("p50")),
                          "memory_mb": _round(ocr.get("memory_mb"), 1)},
            "calibration": {name: m["calibration"] for name, m in ev["models"].items() if m.get("calibration")}}


def ocr_grounded_experiment(run: dict[str, Any] | None, profile: str | None) -> dict[str, Any] | None:
    """The OCR-grounded prompt experiment: this run's (bench/ocr_grounded_prompt.py), else the
    committed measurement for the same profile, saying which it is. A committed measurement
    from the scorer before records were scored field by field is not quoted."""
    source = "this run"
    if run is None:
        try:
            run = json.loads(COMMITTED_OCR_GROUNDED.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if run.get("profile") != profile or "grounded_vs_plain" not in (run.get("verdict") or {}):
            return None
        source = f"{COMMITTED_OCR_GROUNDED.relative_to(REPO_ROOT)} (committed; measured by `{run['command']}`)"
    return {"source": source, "verdict": run.get("verdict"),
            "scores": {mode: run[mode]["scores"] for mode in ("plain", "grounded")},
            "tokens_per_training_sample_p50": {mode: run[mode]["tokens_per_training_sample_p50"]
                                               for mode in ("plain", "grounded")},
            "ocr_latency_p50_s": run["grounded"].get("ocr_latency_p50_s")}


def _with_ci(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "-"
    return f"{_cell(figure['value'])} [{_cell(figure['ci95'][0])}, {_cell(figure['ci95'][1])}]"


def _difference(d: dict[str, Any]) -> str:
    return f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]: {d['verdict']}"


def ocr_grounded_markdown(experiment: dict[str, Any]) -> list[str]:
    """The experiment's table (each subset, plain and grounded) and its verdicts from intervals."""
    parts = ["## OCR-grounded prompt (experiment)", "",
             f"Source: {experiment['source']}. The same pipeline trained and evaluated twice: prompts as "
             "the page alone (plain), and with the page's OCR text before the instruction "
             "(`data.ocr_grounded_prompt=true`). Figures with 95% bootstrap intervals.", "",
             "| set | model | prompts | precision | recall | F1 | ROUGE-L |", "|---|---|---|---|---|---|---|"]
    for subset in experiment["scores"]["grounded"]:
        for mode in ("plain", "grounded"):
            for name, s in experiment["scores"][mode].get(subset, {}).items():
                if mode == "plain" and name not in ("base", "finetuned"):
                    continue  # the baselines do not read the prompt: one row each
                prompts = mode if name in ("base", "finetuned") else "-"
                parts.append(f"| {subset} | {name} | {prompts} | "
                             + " | ".join(_with_ci(s.get(k)) for k in ("precision", "recall", "f1", "rouge_l")) + " |")
    labels = {"grounded_vs_plain": "grounded vs plain prompts (fine-tuned)",
              "grounded_vs_most_common": "grounded fine-tuned vs the most common answer",
              "grounded_vs_ocr_rules": "grounded fine-tuned vs OCR + rules"}
    verdicts = [f"{labels.get(name, name)}, {metric}: {_difference(d)}"
                for name, metrics in (experiment.get("verdict") or {}).items() for metric, d in metrics.items()]
    if verdicts:
        parts += ["", "On the held-out test split (paired bootstrap of the difference): " + "; ".join(verdicts) + ".",
                  "", f"Prompt tokens per training sample (p50): "
                      f"{_cell(experiment['tokens_per_training_sample_p50']['plain'])} plain, "
                      f"{_cell(experiment['tokens_per_training_sample_p50']['grounded'])} grounded; a grounded answer "
                      f"also waits for OCR ({_cell(experiment['ocr_latency_p50_s'])} s per page, p50)."]
    return [*parts, ""]


def reviewed_rows(reviewed: dict[str, Any] | None) -> list[str]:
    """The training table's row on pages from the review store (data.reviewed_records), if any."""
    if not reviewed:
        return []
    return [f"| reviewed pages trained on | {reviewed['pages']} of {reviewed['documents']} documents, "
            f"{reviewed['corrected_documents']} corrected by a reviewer (`{reviewed['export']}`) |"]


def training_speed_rows(train: dict[str, Any]) -> list[str]:
    """Steady-state speed first, then where the rest of the whole run's time went."""
    steady, whole = train.get("steady_state") or {}, train.get("whole_run") or {}
    lengths = train.get("length_check") or {}
    return [f"| steady state | {_cell(steady.get('seconds_per_step'))} s/step, {_cell(steady.get('tokens_per_s'))} "
            f"tokens/s over {steady.get('steps')} steps |",
            f"| whole run | {_cell(whole.get('seconds'))} s ({_cell(whole.get('seconds_per_step'))} s/step, "
            f"{_cell(whole.get('tokens_per_s'))} tokens/s): warm-up {_cell((train.get('warmup') or {}).get('seconds'))} s, "
            f"evaluation {_cell((train.get('evaluation') or {}).get('seconds'))} s, saving "
            f"{_cell((train.get('checkpoint_saving') or {}).get('seconds'))} s |",
            f"| samples too long (dropped in phase 5) | {lengths.get('too_long')} of {lengths.get('samples_checked')} |"]


# --------------------------------------------------------------------------- findings


def findings(report: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers; none is written unless its numbers exist."""
    out = []
    stages = {r["stage"]: r for r in report["stages"] if not r["missing"]}
    base, int4, tuned = (stages.get(k) for k in ("Baseline", "INT4 quantized", "Fine-tuned"))
    if base and int4 and base.get("weights_mb") and int4.get("weights_mb"):
        cut = 100 * (1 - int4["weights_mb"] / base["weights_mb"])
        out.append(f"4-bit quantization ({(report['quantization'] or {}).get('method')}) cut the weights in memory "
                   f"from {base['weights_mb']:.1f} MB to {int4['weights_mb']:.1f} MB ({cut:.1f}% less).")
        change = 100 * (int4["latency_p50_s"] / base["latency_p50_s"] - 1)
        out.append(f"Median latency went from {base['latency_p50_s']:.3f} s to {int4['latency_p50_s']:.3f} s "
                   f"({change:+.1f}%) on the same five documents.")
    train = report.get("training")
    if train and train.get("initial_loss") is not None:
        out.append(f"QLoRA trained {train['trainable_params']:,} parameters ({train['trainable_pct']:.2f}% of "
                   f"{train['total_params']:,}); training loss fell from {train['initial_loss']:.3f} to "
                   f"{train['final_loss']:.3f} in {train['global_step']} steps.")
    out += evaluation_findings(report.get("evaluation") or {}, ("finetuned_vs_base",))
    api = report.get("api_validation")
    if api and api.get("endpoints"):
        ok = sum(1 for e in api["endpoints"].values() if e["ok"])
        out.append(f"API validation: {ok} of {len(api['endpoints'])} endpoint checks passed.")
    if report.get("quality_kind") == "control":
        out.append(f"Quality figures come from the positive control (profile {report.get('profile')}): a stand-in "
                   "pre-trained here to read pages back, then fine-tuned; they show the pipeline teaches what it "
                   "measures, not how the real 7B reads.")
    elif report.get("quality_meaningful") is False:
        out.append("Quality figures come from a model with random weights (profile "
                   f"{report.get('profile')}): they test the plumbing, not medical skill.")
    return out


_VERSUS = {"finetuned_vs_base": "the base model", "finetuned_vs_most_common": "the most common training answer",
           "finetuned_vs_ocr_rules": "OCR + rules",
           "finetuned_vs_finetuned_bf16": "its own full-precision form (what 4 bits cost)"}
_METRIC_WORDS = {"extraction_f1": "extraction F1", "rouge_l": "free-text ROUGE-L"}


def _compared(name: str) -> tuple[str, str, str] | None:
    """A phase-7 comparison's subject (its model key and words) and what it is compared with:
    the fine-tuned model against each of :data:`_VERSUS`, or the fine-tuned model in another
    form (bench.eval_also_forms) against its full-precision form."""
    if name in _VERSUS:
        return "finetuned", "the fine-tuned model", _VERSUS[name]
    if name.startswith("finetuned_") and name.endswith("_vs_finetuned_bf16"):
        form = name.removeprefix("finetuned_").removesuffix("_vs_finetuned_bf16")
        return f"finetuned_{form}", f"the fine-tuned model in {form}", f"its full-precision form (what {form} costs)"
    return None


def evaluation_findings(evaluation: dict[str, Any], comparisons: tuple[str, ...] | None = None) -> list[str]:
    """One sentence per source and comparison (all of phase 7's unless named), its verdict read
    from the 95% interval of the paired difference (never from the point estimates alone)."""
    out = []
    for name in comparisons or tuple(evaluation.get("comparisons") or {}):
        compared = _compared(name)
        if compared is None:
            continue
        model, subject, versus = compared
        for source, metrics in ((evaluation.get("comparisons") or {}).get(name, {}).get("sources") or {}).items():
            for metric, d in metrics.items():
                scored = evaluation["sources"][source].get(model) or {}
                value = scored.get("f1" if metric == "extraction_f1" else "rouge_l")
                words = {"better": "better than", "worse": "worse than",
                         "no significant difference": "not significantly different from"}[d["verdict"]]
                out.append(f"On {source} ({scored.get('cases')} cases) {subject}'s {_METRIC_WORDS[metric]} "
                           f"({_with_ci(value)}) is {words} {versus}: difference "
                           f"{d['difference']:+.3f}, 95% interval [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}].")
    return out


# --------------------------------------------------------------------------- charts


def _save(fig: Any, folder: Path, name: str) -> str:
    """Write ``fig`` as ``folder/name`` (PNG) and free it; returns ``name``."""
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)
    return name


def charts(report: dict[str, Any], folder: Path) -> dict[str, str]:
    """PNG charts under docs/figures/; returns name -> file name (only charts with data)."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    stages = [r for r in report["stages"] if not r["missing"]]
    if stages:
        for key, title, unit, name in (("weights_mb", "Model weights in memory per stage", "MB", "memory_per_stage.png"),
                                       ("latency_p50_s", "Median latency per stage", "s", "latency_per_stage.png")):
            fig, axis = plt.subplots(figsize=(6, 3.4))
            values = [r[key] or 0 for r in stages]
            bars = axis.bar([r["stage"] for r in stages], values, color=["#164a8c", "#2a9d8f", "#c8553d"][:len(stages)])
            axis.bar_label(bars, fmt="%.3g")
            axis.set_title(title)
            axis.set_ylabel(unit)
            made[key] = _save(fig, folder, name)
    curve = report.get("loss_curve") or []
    if curve:
        fig, axis = plt.subplots(figsize=(6, 3.4))
        axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", color="#164a8c")
        axis.set_title("Training loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        made["loss"] = _save(fig, folder, "training_loss.png")
    sources = (report.get("evaluation") or {}).get("sources") or {}
    record_sources = [name for name, models in sources.items() if (models.get("finetuned") or {}).get("f1")]
    if record_sources:
        labels = [("base", "base"), ("finetuned", "fine-tuned"), ("most_common", "most common"),
                  ("ocr_rules", "OCR + rules")]
        fig, axis = plt.subplots(figsize=(6.4, 3.4))
        width = 0.2
        for i, (key, label) in enumerate(labels):
            figures = [(sources[name].get(key) or {}).get("f1") for name in record_sources]
            if not any(figures):
                continue
            values = [f["value"] if f else 0 for f in figures]
            errors = [[f["value"] - f["ci95"][0] if f else 0 for f in figures],
                      [f["ci95"][1] - f["value"] if f else 0 for f in figures]]
            axis.bar([j + i * width for j in range(len(record_sources))], values, width, yerr=errors, capsize=3,
                     label=label)
        axis.set_xticks([j + 1.5 * width for j in range(len(record_sources))], record_sources)
        axis.set_ylim(0, 1)
        axis.set_title("Extraction F1 by source (95% intervals)")
        axis.legend(fontsize=8)
        made["f1"] = _save(fig, folder, "extraction_f1_by_source.png")
    calibration = (report.get("evaluation") or {}).get("calibration") or {}
    if any(c["items"] for c in calibration.values()):
        fig, axis = plt.subplots(figsize=(4.6, 4.2))
        axis.plot([0, 1], [0, 1], linestyle="--", color="#999999", label="calibrated")
        for name, c in calibration.items():
            points = [(b["mean_confidence"], b["accuracy"], b["items"]) for b in c["bins"] if b["items"]]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name} ({c['items']} items)")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("mean confidence in bin")
        axis.set_ylabel("accuracy of items in bin")
        axis.set_title("Reliability of per-item confidence")
        axis.legend(fontsize=8)
        made["calibration"] = _save(fig, folder, "confidence_reliability.png")
    return made


# --------------------------------------------------------------------------- markdown


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def stage_markdown(report: dict[str, Any]) -> str:
    head = "| stage | memory MB | weights MB | peak MB | load s | p50 s | p95 s | TTFT s | tokens/s | size GB | F1 |"
    lines = [head, "|" + "---|" * 11]
    for r in report["stages"]:
        if r["missing"]:
            lines.append(f"| {r['stage']} | missing ({r['source']} not found) |" + " |" * 9)
            continue
        lines.append("| " + " | ".join([r["stage"]] + [_cell(r[k]) for k in (
            "memory_mb", "weights_mb", "peak_memory_mb", "load_time_s", "latency_p50_s", "latency_p95_s", "ttft_s",
            "tokens_per_s", "size_gb", "f1")]) + " |")
    return "\n".join(lines)


def benchmark_markdown(report: dict[str, Any], figures: dict[str, str]) -> str:
    env = report["environment"]
    parts = [
        "# Benchmark report", "",
        f"Profile `{report['profile']}` on {env['hardware']} (Python {env['python']}, PyTorch {env['pytorch']}, "
        f"CUDA {env['cuda'] or 'none'}, transformers {env['transformers']}). Generated by "
        "`scripts/09_generate_report.py` from the files in `benchmarks/`.", "",
    ]
    if report["missing"]:
        parts += [f"**Missing** (phase not run or output unreadable): {', '.join(report['missing'])}.", ""]
    parts += ["## Key findings", "", *[f"- {f}" for f in findings(report)], "",
              "## Stage by stage", "", stage_markdown(report), "",
              "Memory is GPU memory allocated after load on a GPU, process RSS on a CPU; weights is the "
              "model's own footprint. F1 is extraction F1 (records matched field by field) on the five "
              "standard documents.", ""]
    for key in ("weights_mb", "latency_p50_s"):
        if key in figures:
            parts += [f"![{key}](figures/{figures[key]})", ""]
    train = report.get("training")
    if train:
        lora = train.get("lora") or {}
        parts += ["## Training", "", "| item | value |", "|---|---|",
                  f"| LoRA | r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')} |",
                  f"| trainable parameters | {train['trainable_params']:,} of {train['total_params']:,} "
                  f"({_cell(train['trainable_pct'])}%) |",
                  f"| training samples | {train['training_samples']} |",
                  *reviewed_rows(train.get("reviewed_training")),
                  f"| steps / epochs | {train['global_step']} / {_cell(train['epochs'])} |",
                  f"| loss initial -> final | {_cell(train['initial_loss'])} -> {_cell(train['final_loss'])} |",
                  *training_speed_rows(train),
                  f"| peak memory MB | {_cell(train['peak_memory_mb'])} |", ""]
        if "loss" in figures:
            parts += [f"![training loss](figures/{figures['loss']})", ""]
    quant = report.get("quantization")
    if quant:
        parts += ["## Quantization", "", f"Method: **{quant['method']}**."
                  + (f" AWQ was attempted and could not run: `{quant['awq_error']}`." if quant.get("awq_error") else ""),
                  f"Memory reduction {_cell(quant['memory_reduction_pct'])}%, size on disk reduction "
                  f"{_cell(quant['size_reduction_pct'])}%, median latency change {_cell(quant['latency_change_pct'])}%.", ""]
        if quant.get("logits_vs_full_precision"):
            parts += ["Next-token logits against the full-precision model on the five documents (relative L2, mean): "
                      + ", ".join(f"{name.replace('_', ' ')} {_cell(v)}"
                                  for name, v in quant["logits_vs_full_precision"].items()) + ".", ""]
    if report.get("evaluation"):
        parts += evaluation_markdown(report, figures)
    if report.get("ocr_grounded_prompt"):
        parts += ocr_grounded_markdown(report["ocr_grounded_prompt"])
    reliability = report.get("reliability")
    if reliability and reliability.get("summary"):
        s, load = reliability["summary"], reliability.get("load") or {}
        crash = reliability.get("crash_resume") or {}
        parts += ["## Reliability", "", "| measure | value |", "|---|---|",
                  f"| fuzz cases (schemathesis, from the OpenAPI schema) | {s['fuzz_cases']} |",
                  f"| hostile uploads and requests | {s['hostile_requests']} |",
                  f"| server errors (5xx) | {s['server_errors']} |",
                  f"| answers outside the documented statuses/envelope | {s['undocumented_answers']} |",
                  f"| load | {load.get('clients')} clients x {_cell(load.get('duration_s'))} s: {load.get('sent')} sent, "
                  f"{load.get('answered')} answered, {load.get('failed')} failed, {load.get('lost')} lost |",
                  f"| load latency p50 / p95 / p99 s | {_cell((load.get('latency_s') or {}).get('p50'))} / "
                  f"{_cell((load.get('latency_s') or {}).get('p95'))} / {_cell((load.get('latency_s') or {}).get('p99'))} |",
                  f"| server RSS growth under load MB | {_cell((load.get('server_rss_mb') or {}).get('growth'))} |",
                  "| kill -9 and resume | " + (", ".join(f"phase {r['phase']}: {'ok' if r['ok'] else 'FAILED'}"
                                                   for r in crash.get("phases", [])) or "not run") + " |", ""]
    api = report.get("api_validation")
    if api:
        parts += ["## API validation", "", "| check | status | ok | latency s |", "|---|---|---|---|"]
        parts += [f"| {k} | {v['status']} | {'yes' if v['ok'] else 'NO'} | {_cell(v['latency_s'])} |"
                  for k, v in api["endpoints"].items()]
        parts.append("")
    return "\n".join(parts) + "\n"


def evaluation_markdown(report: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Per-source figures with intervals, the verdicts from the intervals, and the error analysis."""
    evaluation = report["evaluation"]
    parts = ["## Evaluation: base vs fine-tuned", "",
             f"Both models evaluated in the form the server serves: **{evaluation.get('served_form')}**. "
             "Extraction answers are parsed into the record and matched item by item (a medication counts "
             "only with its own dose, route and frequency; a lab only with its own value, unit and flag); "
             "free-text references (captions, question answers, transcriptions) are scored with ROUGE-L "
             "only. Every figure carries a bootstrap 95% interval over cases; `medvl-score` reproduces them "
             "from `benchmarks/eval_cases.jsonl` and any model's answers.", "",
             "| source | model | cases | precision | recall | F1 | name recall | ROUGE-L |",
             "|---|---|---|---|---|---|---|---|"]
    for source, models in evaluation["sources"].items():
        for name, s in models.items():
            parts.append(f"| {source} | {name} | {s['cases']} | "
                         + " | ".join(_with_ci(s.get(k)) for k in ("precision", "recall", "f1", "name_recall",
                                                                   "rouge_l")) + " |")
    parts += ["", "Verdicts (fine-tuned minus the other, paired bootstrap; \"better\" or \"worse\" only where "
              "the 95% interval excludes zero):", ""]
    parts += [f"- {sentence}" for sentence in evaluation_findings(evaluation)]
    parts.append("")
    by_type, fields = evaluation.get("finetuned_test_by_type") or {}, evaluation.get("finetuned_test_fields") or {}
    if by_type:
        parts += ["Fine-tuned model on the test split, by item type: " + ", ".join(
            f"{t} F1 {_cell(v['f1'])} (name recall {_cell(v['name_recall'])})" for t, v in by_type.items())
            + "; field agreement where the name matched: "
            + ", ".join(f"{k} {_cell(v['agreement'])}" for k, v in fields.items()) + ".", ""]
    flagged = report.get("flagged_items") or {}
    if flagged:
        parts += ["Plausibility flags on the fine-tuned model's answers: "
                  f"{flagged.get('cases_with_flags', 0)} cases flagged; by rule "
                  f"{json.dumps(flagged.get('by_rule', {}))}.", ""]
    ocr = evaluation.get("ocr_rules") or {}
    if ocr.get("engine"):
        parts += [f"`ocr_rules` is the classical baseline: {ocr['engine']}; {_cell(ocr['latency_p50_s'])} s per "
                  f"page (p50), {_cell(ocr['memory_mb'])} MB for its engine. `most_common` answers every record "
                  "case with the training answers' most frequent items, `empty_record` with the empty record.", ""]
    elif ocr.get("error"):
        parts += [f"The OCR + rules baseline did not run: `{ocr['error']}`.", ""]
    if not any("rouge_l" in s for models in evaluation["sources"].values() for s in models.values()):
        parts += ["No free-text cases in this run (only extraction records), so ROUGE-L was not measured.", ""]
    decoding = report.get("decoding") or {}
    if decoding:
        parts += [f"Extraction answers are decoded under the record's JSON schema: of the fine-tuned model's "
                  f"{decoding['record_answers']}, {decoding['record_valid_against_schema']} are JSON valid against it "
                  f"(parse status {json.dumps(decoding['record_parse_status'])}); "
                  f"{decoding['record_closed_early']} were steered to close their JSON as the token budget ran "
                  f"out, {decoding['record_hit_max_tokens']} hit it before the JSON closed.", ""]
    if "f1" in figures:
        parts += [f"![extraction F1 by source](figures/{figures['f1']})", ""]
    return parts + calibration_markdown(evaluation.get("calibration") or {}, figures)


def calibration_markdown(calibration: dict[str, Any], figures: dict[str, str]) -> list[str]:
    """Per-item confidence against the scorer's verdict: accuracy by confidence bin, and above
    and below the review threshold."""
    if not calibration:
        return []
    threshold = next(iter(calibration.values()))["threshold"]
    parts = ["### Are the confidences right?", "",
             "Each item of a record answer (a PDF's pages merged) gets the confidence /extract gives it (the probability the model "
             "gave its least sure field's exact value, `medvl/medical/confidence.py`) and the scorer's verdict "
             f"(right in every field). Items under {threshold} go to `needs_review`.", "",
             "| model | confidence | items | accuracy | mean confidence |", "|---|---|---|---|---|"]
    for name, c in calibration.items():
        for b in c["bins"]:
            parts.append(f"| {name} | {b['range'][0]:.1f}-{b['range'][1]:.1f} | {b['items']} | "
                         f"{_cell(b['accuracy'])} | {_cell(b['mean_confidence'])} |")
    parts.append("")
    parts += [f"- {name}: {c['items']} items; expected calibration error {_cell(c['expected_calibration_error'])}; "
              f"accuracy at or above {threshold} {_cell(c['above']['accuracy'])} ({c['above']['items']} items), "
              f"below it {_cell(c['below']['accuracy'])} ({c['below']['items']} items)." for name, c in calibration.items()]
    parts.append("")
    if "calibration" in figures:
        parts += [f"![reliability diagram](figures/{figures['calibration']})", ""]
    return parts


# --------------------------------------------------------------------------- content


def content_draft(report: dict[str, Any]) -> tuple[str, str]:
    """(LinkedIn post < 200 words, short post < 280 characters), from the numbers only."""
    env = report["environment"]
    hardware = env["hardware"] or "unknown hardware"
    tiny = report.get("profile") != "7b"
    method = {"bnb-nf4": "bitsandbytes NF4", "awq": "AWQ INT4"}.get((report.get("quantization") or {}).get("method"),
                                                                   "4-bit quantization")
    quant = report.get("quantization") or {}
    train = report.get("training") or {}
    lead = (f"{quant['memory_reduction_pct']:.0f}% less model memory with {method}"
            if quant.get("memory_reduction_pct") is not None else "An end-to-end medical document pipeline")
    scale = ((f" (a {report.get('profile')} run: a stand-in pre-trained and fine-tuned here, the pipeline's "
              "positive control, not the real 7B)") if report.get("quality_kind") == "control" else
             (f" (a {report.get('profile')} run: a stand-in model with random weights, so quality numbers are "
              "not meaningful)") if tiny else "")
    long_post = (
        f"{lead}: Qwen2.5-VL-7B adapted for medical document understanding{scale}.\n\n"
        f"The pipeline quantizes the model with {method}, fine-tunes it with LoRA on the language model "
        f"only ({train.get('trainable_pct', 0):.2f}% of parameters trainable), trains on assistant answers only, "
        "and merges the adapter in full precision before re-quantizing for serving.\n\n"
        f"Every stage is measured by one harness on {hardware}: load time, time to first token, tokens/s, "
        "p50/p95 latency and memory. "
        + " ".join(findings(report)[:2]) +
        "\n\nServed through a FastAPI service with an OpenAI-compatible route and a Gradio demo."
    )
    short = f"{lead}. Qwen2.5-VL-7B + LoRA fine-tuning for medical documents, measured on {hardware}."
    if tiny:
        short += " Stand-in run."
    return long_post, short[:279]


def readme_with_results(readme: str, report: dict[str, Any]) -> str | None:
    """Replace the text between the results markers; None when the markers are absent."""
    if README_START not in readme or README_END not in readme:
        return None
    env = report["environment"]
    block = (f"{README_START}\n_Last pipeline run: profile `{report['profile']}` on {env['hardware']}; "
             f"generated by phase 9 from `benchmarks/`._\n\n{stage_markdown(report)}\n{README_END}")
    return re.sub(re.escape(README_START) + r".*?" + re.escape(README_END), lambda _: block, readme, flags=re.S)
