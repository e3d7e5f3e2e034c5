"""Data-parallel phase 6: two processes through accelerate (gloo on the CPU), tiny profile."""

import json
import os
import shutil
import subprocess
import sys

from medvl.pipeline.gates import PHASES

from conftest import REPO


def test_two_process_training_writes_adapter_and_metrics_once(phases_1_5, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(phases_1_5, wd)
    build_log_before = (wd / "docs" / "BUILD_LOG.md").read_text().count("## Phase 6:")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", str(PHASES[6].script_path),
           "--workdir", str(wd), "--set", "train.max_steps=4", "--set", "train.save_steps=2",
           "--set", "train.eval_steps=100", "--set", "train.logging_steps=1", "--set", "train.quantize_4bit=true"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("phase 6 gate passed") == 1  # judged once, by rank 0
    metrics = json.loads((wd / "benchmarks" / "training_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_batch"] == 2 * 4
    assert metrics["global_step"] == 4 and metrics["final_loss"] < metrics["initial_loss"]
    assert (wd / "docs" / "BUILD_LOG.md").read_text().count("## Phase 6:") == build_log_before + 1
    adapter = wd / "models" / "tiny-qwen25-vl-medical-lora"
    assert (adapter / "adapter_config.json").is_file() and any(adapter.glob("adapter_model.*"))
    checkpoints = sorted(p.name for p in (wd / "models" / "tiny-qwen25-vl-medical-lora-checkpoints").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
