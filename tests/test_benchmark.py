"""The shared benchmark harness, the baseline (phase 3) and quantization (phase 4)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from medvl.core.stats import summarize
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import PHASES, check_phase

from conftest import REPO


def test_summary_statistics_on_known_values():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert stats["avg"] == pytest.approx(4.0)
    assert (stats["min"], stats["max"], stats["p50"], stats["n"]) == (1.0, 10.0, 3.0, 5)
    assert stats["p95"] == pytest.approx(4.0 + 0.8 * 6.0)  # linear between 4 and 10
    assert summarize([2.5])["p95"] == 2.5
    assert summarize([])["n"] == 0


def test_baseline_record_has_real_measurements(phases_1_4, tiny_settings):
    wd = Workdir(phases_1_4)
    assert check_phase(3, wd, tiny_settings) == []
    rec = json.loads(wd.bench("baseline_fp16").read_text())
    assert rec["precision"].startswith("float32") and rec["device"] == "cpu"
    assert len(rec["samples"]) == 5 and len(list(wd.test_images.glob("*.png"))) == 5
    for row in rec["samples"]:
        assert row["latency_s"] > row["ttft_s"] > 0
        assert row["generated_tokens"] > 0 and row["prompt_tokens"] > row["image_tokens"] > 0
    agg = rec["aggregate"]["latency_s"]
    assert agg["min"] <= agg["p50"] <= agg["p95"] <= agg["max"]
    assert rec["load"]["load_time_s"] > 0 and rec["peak_memory_mb"] > 0
    assert "RSS" in rec["memory_kind"]


def test_phase_4_writes_an_awq_w4a16_checkpoint_and_serves_it_4_bit(phases_1_4, tiny_settings):
    wd = Workdir(phases_1_4)
    assert check_phase(4, wd, tiny_settings) == []
    info = json.loads(wd.bench("quantization_info").read_text())
    assert info["method"] == "awq" and info["awq_error"] is None and info["fallback_reason"] is None
    assert info["awq"]["calibration"]["documents"] == tiny_settings.quant.awq_calibration_samples
    assert info["awq"]["versions"]["llmcompressor"] and info["awq"]["calibrate_s"] > 0
    config = json.loads((wd.awq_model_dir(tiny_settings) / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["strategy"]) == (4, 128, False, "group")
    assert "lm_head" in config["ignore"] and all("visual" in name for name in config["ignore"] if name != "lm_head")
    assert (wd.awq_model_dir(tiny_settings) / "recipe.yaml").is_file()
    assert not wd.nf4_model_dir(tiny_settings).exists()
    # Served 4-bit: the weights in memory are below the baseline's (not decompressed on load).
    assert info["weights_footprint_mb"]["quantized"] < info["weights_footprint_mb"]["baseline"]
    quantized = json.loads(wd.bench("quantized_int4").read_text())
    assert quantized["form"].startswith("AWQ int4") and quantized["samples"][0]["generated_tokens"] > 0
    agreement = info["logits_vs_full_precision"]
    assert set(agreement) == {"full_precision", "awq_int4", "nf4", "int4_round_to_nearest", "fp8_dynamic"}
    for name in ("awq_int4", "nf4", "int4_round_to_nearest", "fp8_dynamic"):
        assert len(agreement[name]["relative_l2"]) == 5 and agreement[name]["relative_l2_mean"] > 0
        assert agreement[name]["weights_footprint_mb"] < agreement["full_precision"]["weights_footprint_mb"]


def test_phase_4_falls_back_to_nf4_without_llm_compressor_and_records_why(phases_1_4, tiny_settings, tmp_path):
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(phases_1_4, wd.root)
    script = str(PHASES[4].script_path)
    # llm-compressor out of reach: importing it fails as it does where it is not installed.
    code = ("import runpy, sys; sys.modules['llmcompressor'] = None; "
            f"sys.argv = [{script!r}, '--workdir', {str(wd.root)!r}]; runpy.run_path({script!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_phase(4, wd, tiny_settings) == []
    info = json.loads(wd.bench("quantization_info").read_text())
    assert info["method"] == "bnb-nf4" and info["fallback_reason"] == info["awq_error"]
    assert info["awq_error"].startswith("llm-compressor cannot be imported: ModuleNotFoundError")
    assert info["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert json.loads((wd.nf4_model_dir(tiny_settings) / "config.json").read_text())["quantization_config"]["load_in_4bit"]
    assert not wd.awq_model_dir(tiny_settings).exists()  # never a stale AWQ folder beside the NF4 one
    assert set(info["logits_vs_full_precision"]) == {"full_precision", "nf4", "int4_round_to_nearest", "fp8_dynamic"}
    assert info["weights_footprint_mb"]["quantized"] < info["weights_footprint_mb"]["baseline"]


def test_gate_4_fails_when_quantized_memory_is_not_smaller(phases_1_4, tiny_settings, tmp_path):
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(phases_1_4, wd.root)
    info = json.loads(wd.bench("quantization_info").read_text())
    info["weights_footprint_mb"]["quantized"] = info["weights_footprint_mb"]["baseline"] + 1
    wd.bench("quantization_info").write_text(json.dumps(info))
    assert any("not below the baseline" in p for p in check_phase(4, wd, tiny_settings))
