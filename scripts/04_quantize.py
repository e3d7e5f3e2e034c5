#!/usr/bin/env python3
"""Phase 4: quantize to 4 bits and benchmark the result against the baseline.

Attempts AWQ INT4 (zero_point, group size 128, 4 bits). If it cannot run (AutoAWQ missing
or incompatible with transformers 5, no GPU), the exact reason is recorded and the model is
quantized with bitsandbytes NF4 instead (double quant, bf16 compute, vision tower and
lm_head unquantized), saved to models/<slug>-bnb-nf4/. Benchmarks it on the phase-3
documents and prompts, and prints FP16 vs INT4. Writes benchmarks/quantization_info.json
and benchmarks/quantized_int4.json.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from medvl import benchmark, quantize  # noqa: E402
from medvl.gates import PHASES  # noqa: E402
from medvl.io import append_build_log, atomic_write_json, dir_size_bytes, read_json  # noqa: E402
from medvl.modeling import load_model, load_processor  # noqa: E402
from medvl.phase import log, run_phase  # noqa: E402
from medvl.settings import Settings  # noqa: E402
from medvl.workdir import Workdir  # noqa: E402


def change_pct(new: float, old: float) -> float:
    return (new - old) / old * 100 if old else 0.0


def main(settings: Settings, wd: Workdir) -> dict:
    base_dir = wd.base_model_dir(settings)
    sections = PHASES[4].sections

    # ---- quantize: AWQ first, NF4 when AWQ cannot run here
    awq_error = "AWQ disabled by quant.try_awq=false"
    if settings.quant.try_awq:
        try:
            done = quantize.try_awq(base_dir, wd.awq_model_dir(settings), settings)
            method, out_dir, awq_error = "awq", wd.awq_model_dir(settings), None
        except quantize.AwqUnavailable as exc:
            awq_error = str(exc)
            log.warning("AWQ not used: %s -> falling back to bitsandbytes NF4", awq_error)
    if awq_error is not None:
        done = quantize.save_nf4(base_dir, wd.nf4_model_dir(settings), settings)
        method, out_dir = "bnb-nf4", wd.nf4_model_dir(settings)

    # ---- benchmark the quantized model exactly as phase 3 measured the baseline
    samples = benchmark.load_benchmark_samples(wd.test_images)
    processor = load_processor(out_dir, settings)
    # The saved config carries its quantization_config, so a plain load restores 4-bit layers.
    result = benchmark.benchmark_variant("int4", lambda: load_model(out_dir, settings), processor, samples,
                                         settings.bench.max_new_tokens, settings.bench.warmup_runs, settings.decode)
    quantized = {**settings.record(sections), "method": method,
                 "model_dir": str(out_dir.relative_to(wd.root)), **result}
    atomic_write_json(wd.bench("quantized_int4"), quantized)

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
        "awq_config": quantize.awq_quant_config(settings),
        "quantization_config": done.get("quantization_config"),
        "quantize_time_s": done["time_s"],
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
    atomic_write_json(wd.bench("quantization_info"), info)

    log.info("\n%s", benchmark.summary_table([("baseline " + baseline["precision"].split()[0], baseline),
                                              (f"int4 {method}", quantized)]))
    log.info("memory (weights) %.1f -> %.1f MB (%.1f%% less); size on disk %.1f%% less; "
             "p50 latency %+.1f%%; responses non-empty: %s", base_mem, quant_mem,
             info["memory_reduction_pct"], info["size_reduction_pct"], info["latency_change_pct"],
             info["responses_non_empty"])
    append_build_log(wd.build_log, 4, "quantization", [
        f"Method: {method}." + (f" AWQ was attempted and failed: {awq_error}" if method != "awq" else ""),
        f"Quantized in {done['time_s']:.1f} s into `{out_dir.relative_to(wd.root)}`.",
        f"Weights in memory {base_mem:.1f} -> {quant_mem:.1f} MB ({info['memory_reduction_pct']:.1f}% less); "
        f"on disk {base_size / 1e9:.3f} -> {quant_size / 1e9:.3f} GB.",
        f"Latency p50 {base_p50:.3f} -> {quant_p50:.3f} s ({info['latency_change_pct']:+.1f}%); "
        f"tokens/s {baseline['aggregate']['tokens_per_s']['avg']:.1f} -> "
        f"{quantized['aggregate']['tokens_per_s']['avg']:.1f}.",
    ])
    return info


if __name__ == "__main__":
    run_phase(4, main, __doc__)
