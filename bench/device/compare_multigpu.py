#!/usr/bin/env python3
"""Compare a 1-GPU and a 2-GPU phase-6 run (same global batch) into perf_multigpu.json."""

import json
import sys
from pathlib import Path


def loss_at(curve: list[dict], step: int) -> float | None:
    points = [p["loss"] for p in curve if p["step"] == step]
    return points[0] if points else None


def main(one: str, two: str, out: str) -> None:
    a, b = json.loads(Path(one).read_text()), json.loads(Path(two).read_text())
    steps = min(a["global_step"], b["global_step"])
    result = {
        "gpu": a.get("gpu"),
        "global_batch": {"1gpu": a["global_batch"], "2gpu": b["global_batch"]},
        "steps": steps,
        "samples_seen": steps * a["global_batch"],
        "steady_tokens_per_s": {"1gpu": a["steady_state"]["tokens_per_s"], "2gpu": b["steady_state"]["tokens_per_s"]},
        "speedup": (b["steady_state"]["tokens_per_s"] / a["steady_state"]["tokens_per_s"]
                    if a["steady_state"]["tokens_per_s"] else None),
        "steady_seconds_per_step": {"1gpu": a["steady_state"]["seconds_per_step"],
                                    "2gpu": b["steady_state"]["seconds_per_step"]},
        "loss_at_last_step": {"1gpu": loss_at(a["loss_curve"], steps), "2gpu": loss_at(b["loss_curve"], steps)},
        "loss_curve": {"1gpu": a["loss_curve"], "2gpu": b["loss_curve"]},
        "peak_memory_mb_per_gpu": {"1gpu": a["peak_memory_mb"], "2gpu (rank 0)": b["peak_memory_mb"]},
        "train_time_s": {"1gpu": a["train_time_s"], "2gpu": b["train_time_s"]},
        "note": "7b-random (random weights): losses compare optimisation, not quality. Throughput includes "
                "no warm-up steps, evaluation or saving (steady_state in training_metrics.json).",
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
