"""The shared benchmark harness, the baseline (phase 3) and quantization (phase 4)."""

import json
import sys

import pytest

from medvl import quantize
from medvl.benchmark import summarize
from medvl.gates import check_phase
from medvl.workdir import Workdir


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


def test_quantization_falls_back_to_nf4_and_records_why(phases_1_4, tiny_settings):
    wd = Workdir(phases_1_4)
    assert check_phase(4, wd, tiny_settings) == []
    info = json.loads(wd.bench("quantization_info").read_text())
    assert info["method"] == "bnb-nf4"
    assert "AutoAWQ" in info["awq_error"] and info["fallback_reason"] == info["awq_error"]
    assert info["weights_footprint_mb"]["quantized"] < info["weights_footprint_mb"]["baseline"]
    assert info["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    config = json.loads((wd.nf4_model_dir(tiny_settings) / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] is True
    assert json.loads(wd.bench("quantized_int4").read_text())["samples"][0]["generated_tokens"] > 0


def test_awq_attempt_reports_import_failure(monkeypatch, tmp_path, tiny_settings):
    monkeypatch.setitem(sys.modules, "awq", None)  # what an uninstalled/broken AutoAWQ looks like
    with pytest.raises(quantize.AwqUnavailable, match="AutoAWQ cannot be imported"):
        quantize.try_awq(tmp_path, tmp_path / "out", tiny_settings)


def test_gate_4_fails_when_quantized_memory_is_not_smaller(phases_1_4, tiny_settings, tmp_path):
    import shutil

    wd = Workdir(tmp_path / "wd")
    shutil.copytree(phases_1_4, wd.root)
    info = json.loads(wd.bench("quantization_info").read_text())
    info["weights_footprint_mb"]["quantized"] = info["weights_footprint_mb"]["baseline"] + 1
    wd.bench("quantization_info").write_text(json.dumps(info))
    assert any("not below the baseline" in p for p in check_phase(4, wd, tiny_settings))
