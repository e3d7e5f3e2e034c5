"""Shared fixtures: the tiny stand-in model and a pipeline run in a temporary workdir.

Everything runs on the real tiny Qwen2.5-VL stand-in; nothing is mocked and nothing
touches the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.core.settings import Settings, load_settings
from medvl.model.standin import build_standin
from medvl.pipeline.gates import PHASES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_settings() -> Settings:
    return load_settings("tiny")


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tiny_settings):
    """The serving engine over the tiny model, 4 cache slots, driven by the test's thread."""
    from medvl.engine.loader import build_engine
    from medvl.model.loading import load_model, load_processor

    model = load_model(tiny_model_dir, tiny_settings)
    return build_engine(model, load_processor(tiny_model_dir, None), tiny_settings.decode, slots=4)


def run_to_end(engine, requests):
    """Drive the engine's loop in this thread until every request has ended; their results."""
    while not all(r.future.done() for r in requests):
        engine.run_once()
    engine.drain()
    return [r.future.result() for r in requests]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_settings) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    m = tiny_settings.model
    build_standin(out, m.standin_architecture, m.standin_tokenizer, m.standin_tokenizer_vocab,
                  m.min_pixels, m.max_pixels, m.seed)
    return out


def pipeline(workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    """Run ./run_pipeline.sh on the current interpreter (no second venv) in ``workdir``."""
    env = {**os.environ, "MEDVL_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(REPO / "run_pipeline.sh"), "--workdir", str(workdir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def phase_script(number: int, workdir: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    script = PHASES[number].script_path
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(script), "--workdir", str(workdir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def phases_1_2(tmp_path_factory) -> Path:
    """A workdir where phases 1-2 ran on the tiny profile (read-only for tests)."""
    wd = tmp_path_factory.mktemp("run12")
    for number in (1, 2):
        result = phase_script(number, wd)
        assert result.returncode == 0, result.stderr[-3000:]
    return wd


def extend_run(base: Path, phases: tuple[int, ...], tmp_path_factory, name: str) -> Path:
    """A copy of the workdir ``base`` with ``phases`` run on top (each must pass)."""
    wd = tmp_path_factory.mktemp(name) / "wd"
    shutil.copytree(base, wd)
    for number in phases:
        result = phase_script(number, wd)
        assert result.returncode == 0, result.stderr[-3000:]
    return wd


@pytest.fixture(scope="session")
def phases_1_4(phases_1_2, tmp_path_factory) -> Path:
    """A workdir where phases 1-4 ran on the tiny profile (read-only for tests)."""
    return extend_run(phases_1_2, (3, 4), tmp_path_factory, "run14")


@pytest.fixture(scope="session")
def phases_1_5(phases_1_4, tmp_path_factory) -> Path:
    """A workdir where phases 1-5 ran on the tiny profile, offline (read-only for tests)."""
    return extend_run(phases_1_4, (5,), tmp_path_factory, "run15")


@pytest.fixture(scope="session")
def phases_1_6(phases_1_5, tmp_path_factory) -> Path:
    """A workdir where phases 1-6 ran on the tiny profile (read-only for tests)."""
    return extend_run(phases_1_5, (6,), tmp_path_factory, "run16")


@pytest.fixture(scope="session")
def full_run(phases_1_6, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """phases_1_6 plus run_pipeline.sh, which must resume at phase 7 and finish phase 9."""
    wd = tmp_path_factory.mktemp("runall") / "wd"
    shutil.copytree(phases_1_6, wd)
    (wd / "README.md").write_text("# run\n\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    return wd, pipeline(wd)
