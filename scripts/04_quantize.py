#!/usr/bin/env python3
"""Phase 4: quantize to 4 bits, benchmark the result, and measure how far each 4-bit form is.

AWQ INT4 first, with the seed's settings (4 bits, group 128, zero point) through llm-compressor,
calibrated on training-generator pages of its own seeds; saved to models/<slug>-awq-int4/ as a
compressed-tensors W4A16 checkpoint (vision tower and lm_head in full precision) and served
through torchao's int4 kernel. If AWQ cannot run, the exact reason is recorded and the model is
quantized with bitsandbytes NF4 instead (models/<slug>-bnb-nf4/). The chosen form runs the
phase-3 documents through the shared harness; next-token logits of AWQ, NF4 and round-to-nearest
int4 are compared with the full-precision model's on the same documents. Writes
benchmarks/quantization_info.json and benchmarks/quantized_int4.json.
"""


from medvl.core.io import append_build_log, atomic_write_json, dir_size_bytes, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.engine.pages import PageLimits
from medvl.evaluation import benchmark
from medvl.medical import ocr
from medvl.model.forms import FORMS, METHOD_FORMS, load_in_form
from medvl.model.loading import load_processor
from medvl.model.quantize import forms_agreement, quantize_base
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import log, run_phase

PHASE = PHASES[4]


def change_pct(new: float, old: float) -> float:
    return (new - old) / old * 100 if old else 0.0


def main(settings: Settings, wd: Workdir) -> dict:
    ocr.use_backend(settings.api.ocr_backend)  # grounded calibration pages read as the server reads pages
    base_dir = wd.base_model_dir(settings)
    sections = PHASE.sections
    method, out_dir, done, awq_error = quantize_base(settings, wd)
    form = METHOD_FORMS[method]

    # ---- benchmark the quantized model in its served form, exactly as phase 3 measured the baseline
    samples = benchmark.load_benchmark_samples(wd.test_images)
    processor = load_processor(out_dir, settings)
    result = benchmark.benchmark_variant("int4", lambda: load_in_form(out_dir, settings, form), processor, samples,
                                         settings.bench.max_new_tokens, settings.bench.warmup_runs, settings.decode,
                                         benchmark.load_benchmark_pdfs(wd.test_images),
                                         PageLimits.from_settings(settings.api))
    quantized = {**settings.record(sections), "method": method, "form": FORMS[form],
                 "model_dir": str(out_dir.relative_to(wd.root)), **result}
    atomic_write_json(PHASE.output(wd, "quantized_int4.json"), quantized)
    agreement = forms_agreement(settings, wd, method, samples)

    # ---- compare with the baseline
    baseline = read_json(wd.bench("baseline_fp16"))
    base_size, quant_size = dir_size_bytes(base_dir), dir_size_bytes(out_dir)
    base_mem = baseline["load"]["weights_footprint_mb"]
    quant_mem = quantized["load"]["weights_footprint_mb"]
    base_p50 = baseline["aggregate"]["latency_s"]["p50"]
    quant_p50 = quantized["aggregate"]["latency_s"]["p50"]
    info = {
        **settings.record(sections),
        "method": method,
        "awq_attempted": settings.quant.try_awq,
        "awq_error": awq_error,
        "fallback_reason": awq_error if method != "awq" else None,
        "awq_settings": {"w_bit": settings.quant.awq_w_bit, "group_size": settings.quant.awq_group_size,
                         "zero_point": settings.quant.awq_zero_point,
                         "calibration_samples": settings.quant.awq_calibration_samples},
        "awq": {k: done[k] for k in ("calibrate_s", "peak_memory_mb", "memory_kind", "versions", "calibration")
                if k in done} if method == "awq" else None,
        "quantization_config": done.get("quantization_config"),
        "quantize_time_s": done["time_s"],
        "served_form": FORMS[form],
        "logits_vs_full_precision": agreement,
        "output_dir": str(out_dir.relative_to(wd.root)),
        "size_on_disk_bytes": {"baseline": base_size, "quantized": quant_size},
        "size_reduction_pct": -change_pct(quant_size, base_size),
        "weights_footprint_mb": {"baseline": base_mem, "quantized": quant_mem},
        "memory_reduction_pct": -change_pct(quant_mem, base_mem),
        "peak_memory_mb": {"baseline": baseline["peak_memory_mb"], "quantized": quantized["peak_memory_mb"]},
        "latency_p50_s": {"baseline": base_p50, "quantized": quant_p50},
        "latency_change_pct": change_pct(quant_p50, base_p50),
        "responses_non_empty": all(s["response"].strip() for s in quantized["samples"]),
    }
    atomic_write_json(PHASE.output(wd, "quantization_info.json"), info)

    log.info("\n%s", benchmark.summary_table([("baseline " + baseline["precision"].split()[0], baseline),
                                              (f"int4 {method}", quantized)]))
    log.info("memory (weights) %.1f -> %.1f MB (%.1f%% less); size on disk %.1f%% less; "
             "p50 latency %+.1f%%; responses non-empty: %s", base_mem, quant_mem,
             info["memory_reduction_pct"], info["size_reduction_pct"], info["latency_change_pct"],
             info["responses_non_empty"])
    append_build_log(wd.build_log, PHASE.number, "quantization", [
        f"Method: {method}." + (f" AWQ was attempted and failed: {awq_error}" if method != "awq" else
                                f" Calibrated on {done['calibration']['documents']} pages "
                                f"({done['calibration']['tokens']} tokens) in {done['calibrate_s']:.1f} s."),
        f"Quantized in {done['time_s']:.1f} s into `{out_dir.relative_to(wd.root)}`; served as {FORMS[form]}.",
        "Next-token logits vs full precision (relative L2, mean over the documents): " + ", ".join(
            f"{name} {rec['relative_l2_mean']:.4f}" for name, rec in agreement.items() if "relative_l2_mean" in rec) + ".",
        f"Weights in memory {base_mem:.1f} -> {quant_mem:.1f} MB ({info['memory_reduction_pct']:.1f}% less); "
        f"on disk {base_size / 1e9:.3f} -> {quant_size / 1e9:.3f} GB.",
        f"Latency p50 {base_p50:.3f} -> {quant_p50:.3f} s ({info['latency_change_pct']:+.1f}%); "
        f"tokens/s {baseline['aggregate']['tokens_per_s']['avg']:.1f} -> "
        f"{quantized['aggregate']['tokens_per_s']['avg']:.1f}.",
    ])
    return info


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
