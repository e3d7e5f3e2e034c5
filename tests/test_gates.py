"""Gates: a deleted, corrupted or stale output fails its gate with a reason, and the
pipeline resumes at that phase."""

import json
import shutil

import pytest

from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir
from medvl.pipeline.gates import check_phase, first_failing

from conftest import pipeline


@pytest.fixture()
def run12(phases_1_2, tmp_path):
    """A private copy of a workdir where phases 1-2 passed, free to damage."""
    wd = tmp_path / "wd"
    shutil.copytree(phases_1_2, wd)
    return Workdir(wd)


def test_phases_1_and_2_pass_and_record_settings(run12, tiny_settings):
    assert check_phase(1, run12, tiny_settings) == []
    assert check_phase(2, run12, tiny_settings) == []
    record = json.loads(run12.bench("model_download").read_text())
    assert record["profile"] == "tiny" and record["validated"] is True
    assert record["settings"]["model"]["slug"] == "tiny-qwen25-vl"
    assert record["size_gb"] > 0 and record["weight_files"]
    assert "## Phase 2: base model" in run12.build_log.read_text()


def test_deleted_output_fails_with_reason(run12, tiny_settings):
    run12.bench("model_download").unlink()
    problems = check_phase(2, run12, tiny_settings)
    assert any("model_download.json is missing" in p for p in problems)
    assert first_failing(run12, tiny_settings) == 2


def test_corrupt_json_fails_with_reason(run12, tiny_settings):
    run12.bench("environment").write_text('{"python": ')
    problems = check_phase(1, run12, tiny_settings)
    assert any("not valid JSON" in p for p in problems)
    assert first_failing(run12, tiny_settings) == 1


def test_truncated_weights_fail_with_reason(run12, tiny_settings):
    weights = next(run12.base_model_dir(tiny_settings).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    problems = check_phase(2, run12, tiny_settings)
    assert any("truncated" in p for p in problems), problems


def test_changed_setting_invalidates_outputs(run12, tiny_settings):
    changed = load_settings("tiny", ["model.seed=7"])
    problems = check_phase(2, run12, changed)
    assert any("stale" in p for p in problems), problems
    # A setting phase 2 does not depend on leaves it valid.
    assert check_phase(2, run12, load_settings("tiny", ["train.lora_r=4"])) == []


def test_pipeline_resumes_at_the_broken_phase(run12):
    run12.bench("model_download").unlink()
    result = pipeline(run12.root, "--to", "2")
    assert "First failing gate: phase 2" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "phase 2 gate passed" in result.stderr
    assert "phase 1 (" not in result.stderr  # phase 1 was not rerun
    assert run12.bench("model_download").is_file()


def test_gates_cli_prints_first_failing(run12):
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, "-m", "medvl.cli.gates", "--first-failing", "--workdir",
                          str(run12.root)], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"  # phases 1-2 pass; 3 is next
