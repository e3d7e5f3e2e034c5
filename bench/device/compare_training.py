#!/usr/bin/env python3
"""Phase 6's steady-state tokens/s against perf_training.py's project path at the same batch.

Usage: compare_training.py training_metrics.json perf_training.json out.json
"""

import json
import sys
from pathlib import Path


def main(metrics_path: str, perf_path: str, out: str) -> None:
    metrics, perf = json.loads(Path(metrics_path).read_text()), json.loads(Path(perf_path).read_text())
    batch = metrics["batch"]["per_device"]
    reference = perf["paths"]["project"]["batches"][f"batch_{batch}"]
    steady = metrics["steady_state"]
    result = {
        "gpu": metrics.get("gpu"),
        "batch": batch,
        "phase6_steady_tokens_per_s": steady["tokens_per_s"],
        "phase6_steady_seconds_per_step": steady["seconds_per_step"],
        "phase6_steady_steps": steady["steps"],
        "phase6_whole_run": metrics["whole_run"],
        "phase6_warmup": metrics["warmup"],
        "phase6_evaluation": metrics["evaluation"],
        "phase6_checkpoint_saving": metrics["checkpoint_saving"],
        "perf_script_tokens_per_s": reference["tokens_per_s"],
        "perf_script_seconds_per_step": reference["seconds_per_step"],
        "ratio": steady["tokens_per_s"] / reference["tokens_per_s"],
        "note": "phase 6 runs the Trainer (paged 8-bit AdamW, grad clipping, dataloader workers, its "
                "own data order); perf_training.py times bare optimizer steps (torch AdamW) on the first rows",
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:4])
