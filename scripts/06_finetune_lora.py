#!/usr/bin/env python3
"""Phase 6: QLoRA fine-tuning on the phase-5 conversations.

Loads the base in bitsandbytes NF4 (bf16 compute; as saved with train.quantize_4bit false),
freezes the whole vision tower, puts LoRA on the language model's q/k/v/o/gate/up/down
projections only (and its output head with train.lora_output_head), and trains on the
assistant answers only (see medvl/training/trainer.py). Checkpoints every train.save_steps
(keeping train.save_total_limit); a rerun after a crash resumes from the last complete
checkpoint. The loss is a token mean over each optimizer step; samples too long for
train.max_length were dropped (and counted) by phase 5. Saves the adapter and processor to
models/<slug>-medical-lora/ and benchmarks/training_metrics.json (steady-state speed beside
the whole run); training curves go to logs/tensorboard/ (`tensorboard --logdir logs/tensorboard`). Started with `accelerate launch --num_processes N` (or
`run_pipeline.sh --gpus N`) it trains data-parallel on N GPUs; the global batch is
per_device_batch_size x grad_accum_steps x N.
"""



from medvl.core.io import append_build_log, atomic_write_json, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase
from medvl.training import trainer

PHASE = PHASES[6]


def main(settings: Settings, wd: Workdir) -> dict:
    fingerprint = settings.fingerprint(PHASE.sections)
    formatted = wd.datasets / "formatted"
    try:
        metrics = trainer.run_training(
            settings, wd.base_model_dir(settings), formatted, wd.adapter_dir(settings),
            wd.models / f"{settings.model.slug}-medical-lora-checkpoints", fingerprint, wd.logs / "tensorboard")
    except (trainer.TruncationError, trainer.TrainingSetupError) as exc:
        raise PhaseError(str(exc)) from None
    if metrics is None:  # a non-main data-parallel rank: the main process reports
        return {}
    t = settings.train
    data_summary = read_json(formatted / "data_summary.json")
    record = {**settings.record(PHASE.sections), "adapter_dir": str(wd.adapter_dir(settings).relative_to(wd.root)),
              "lora": {"r": t.lora_r, "alpha": t.lora_alpha, "dropout": t.lora_dropout,
                       "target_modules": trainer.lora_targets(settings), "quantized_base": "nf4" if t.quantize_4bit else None},
              "batch": {"per_device": t.per_device_batch_size, "grad_accum": t.grad_accum_steps,
                        "max_length": t.max_length},
              "length_check": data_summary["length_check"],
              # pages from the review store's export (data.reviewed_records): how many, of how many
              # documents, how many of those corrected by a reviewer; null without one
              "reviewed_training": data_summary.get("reviewed"),
              **metrics}
    atomic_write_json(PHASE.output(wd, "training_metrics.json"), record)
    log.info("loss %.4f -> %.4f over %d steps; %s; peak %.0f MB", metrics["initial_loss"], metrics["final_loss"],
             metrics["global_step"], speed_line(metrics), metrics["peak_memory_mb"])
    where = "projections and its output head" if t.lora_output_head else "projections only"
    append_build_log(wd.build_log, PHASE.number, "QLoRA fine-tuning" if t.quantize_4bit else "LoRA fine-tuning", [
        f"LoRA r={t.lora_r}, alpha={t.lora_alpha}, dropout={t.lora_dropout} on the language model's "
        f"{where}; base {'NF4' if t.quantize_4bit else 'unquantized'}; vision tower frozen.",
        f"Trainable {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters "
        f"({metrics['trainable_pct']:.2f}%).",
        f"{metrics['global_step']} steps on {metrics['training_samples']} samples"
        + (f" (resumed from step {metrics['resumed_from_step']})" if metrics["resumed_from_step"] else "")
        + f"; loss {metrics['initial_loss']:.4f} -> {metrics['final_loss']:.4f} (token mean per optimizer step); "
        f"{speed_line(metrics)}; peak memory {metrics['peak_memory_mb']:.0f} MB on {metrics['gpu'] or 'CPU'}.",
        f"Samples too long for max_length {t.max_length}: {record['length_check']['too_long']} dropped in phase 5.",
    ])
    return record


def speed_line(metrics: dict) -> str:
    """Steady-state speed with the whole run beside it (warm-up, evaluation, saving apart)."""
    steady, whole = metrics["steady_state"], metrics["whole_run"]
    head = (f"steady {steady['seconds_per_step']:.2f} s/step, {steady['tokens_per_s']:.0f} tokens/s over "
            f"{steady['steps']} steps" if steady["steps"] else "too few steps for a steady-state figure")
    return (f"{head}; whole run {whole['seconds']:.1f} s (warm-up {metrics['warmup']['seconds']:.1f} s, "
            f"evaluation {metrics['evaluation']['seconds']:.1f} s, saving {metrics['checkpoint_saving']['seconds']:.1f} s)")


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
