#!/usr/bin/env python3
"""Phase 3: benchmark the base model in half precision on five medical documents.

Writes the five test documents (one of each kind) and one two-page PDF (a discharge summary,
then lab results) to datasets/test_images/ - every later benchmark reuses them - then loads the base model in FP16 on a GPU (bf16 where FP16 is
unsafe, recorded) with device_map="auto" and flash-attention 2 when installed, else SDPA;
float32 on a CPU, labelled. Saves benchmarks/baseline_fp16.json.
"""



from medvl.core.io import append_build_log, atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.engine.pages import PageLimits
from medvl.evaluation import benchmark
from medvl.model.loading import attention_implementation, half_dtype, load_model, load_processor
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import log, run_phase

PHASE = PHASES[3]


def main(settings: Settings, wd: Workdir) -> dict:
    samples = benchmark.ensure_benchmark_documents(
        wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    model_dir = wd.base_model_dir(settings)
    dtype, precision = half_dtype()
    processor = load_processor(model_dir, settings)
    result = benchmark.benchmark_variant(
        "baseline", lambda: load_model(model_dir, settings, "none", dtype), processor, samples,
        settings.bench.max_new_tokens, settings.bench.warmup_runs, settings.decode,
        benchmark.load_benchmark_pdfs(wd.test_images), PageLimits.from_settings(settings.api))
    record = {**settings.record(PHASE.sections), "model_dir": str(model_dir.relative_to(wd.root)),
              "precision": precision, "attention": attention_implementation(settings),
              "quality_meaningful": settings.model.source == "hub", **result}
    atomic_write_json(PHASE.output(wd, "baseline_fp16.json"), record)

    log.info("\n%s", benchmark.summary_table([("baseline " + precision.split()[0], record)]))
    agg = record["aggregate"]
    append_build_log(wd.build_log, PHASE.number, "baseline benchmark", [
        f"Wrote {len(samples)} test documents and {len(record['documents'])} two-page PDF to `datasets/test_images/` "
        f"(seed {settings.bench.document_seed}).",
        f"Base model in {precision} on {record['gpu'] or 'CPU'}, attention {record['attention']}.",
        f"Load {record['load']['load_time_s']:.2f} s; latency p50 {agg['latency_s']['p50']:.3f} s, "
        f"p95 {agg['latency_s']['p95']:.3f} s; TTFT avg {agg['ttft_s']['avg']:.3f} s; "
        f"{agg['tokens_per_s']['avg']:.1f} tokens/s; peak memory {record['peak_memory_mb']:.0f} MB "
        f"({record['memory_kind']}).",
        *[f"PDF {row['doc_id']}: {row['pages']} pages in {row['latency_s']:.2f} s (rendering {row['render_s']:.3f} s), "
          f"items by page {row['items_by_page']}." for row in record["documents"]],
    ])
    return record


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
