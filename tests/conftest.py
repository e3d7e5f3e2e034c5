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
from medvl.core.workdir import Workdir
from medvl.medical.documents import (
    LINE_HEIGHT,
    MARGIN,
    MedicalDocument,
    benchmark_documents,
    body_font,
    line_positions,
)
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


def lab_page_document(settings: Settings) -> MedicalDocument:
    """The lab report among the pages phase 3 draws (``datasets/test_images/*lab_results*.png``)."""
    b = settings.bench
    return next(d for d in benchmark_documents(b.document_seed, b.num_documents) if d.kind == "lab_results")


def drawn_box(doc: MedicalDocument, line_start: str, value: str, from_right: bool = False) -> list[float]:
    """Where the generator drew ``value`` on the line starting with ``line_start``, in pixels."""
    y, line = next((y, line) for y, line in line_positions(doc) if line.startswith(line_start))
    at = line.rindex(value) if from_right else line.index(value, 0 if value == line_start else len(line_start))
    font = body_font(doc)
    return [MARGIN + font.getlength(line[:at]), y, MARGIN + font.getlength(line[:at + len(value)]), y + LINE_HEIGHT]


# A lab the lab page does not show, taught beside the page's own labs: a value to find no box for.
INVENTED_LAB = {"name": "Ferritin", "value": "412", "unit": "ug/L", "flag": "", "reference_range": "30-400"}


@pytest.fixture(scope="session")
def lab_page_model(phases_1_4, tiny_settings, tmp_path_factory) -> Path:
    """The tiny base model taught to answer /extract on phase 3's lab page: every lab the page
    shows, plus :data:`INVENTED_LAB`, which it does not.

    The random stand-in cannot read a page, so its values are never on it and no field of its
    answers gets a box; a model that reads this one page is what lets a test see a confidence and
    a box on the same field. Every language weight is trained (the vision tower frozen) on that
    one conversation until the answer's loss is under 0.005: about 20 AdamW steps, 1-2 s here.
    The answer is memorised, not read, so this model says nothing about accuracy: it exercises
    the path from the served tokens' probabilities and the page's OCR to each field's confidence
    and box, through the real server.
    """
    import json

    import torch

    from medvl.medical.prompts import EXTRACTION_PROMPT
    from medvl.medical.records import record_answer
    from medvl.model.loading import load_model, load_processor
    from medvl.training.trainer import IGNORE_INDEX, VisionChatCollator, answer_only_loss

    base = Workdir.at(phases_1_4).base_model_dir(tiny_settings)
    page = next(Workdir.at(phases_1_4).test_images.glob("*lab_results*.png"))
    record = lab_page_document(tiny_settings).structured()
    record["lab_values"].append(INVENTED_LAB)
    conversation = {"image": page.name, "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": EXTRACTION_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": record_answer(record)}]}]}
    torch.manual_seed(0)
    model = load_model(base, tiny_settings, dtype=torch.float32)
    batch = VisionChatCollator(load_processor(base, None, padding_side="right"), 4096, page.parent)([conversation])
    labels = batch.pop("labels")
    assert (labels != IGNORE_INDEX).sum() > 100
    model.train()
    model.requires_grad_(True)
    model.model.visual.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(200):
        loss, _ = answer_only_loss(model, batch, labels)
        if loss.item() < 0.005:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.005, f"the page was not learnt: loss {loss.item():.4f}"
    out = tmp_path_factory.mktemp("lab-page-model") / "model"
    shutil.copytree(base, out)
    model.eval().save_pretrained(out)
    (out / "TAUGHT.json").write_text(json.dumps({"page": page.name, "answer": record}, indent=1))
    return out


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian's ``postgresql``: initdb + pg_ctl in a folder of its own,
    on a free port, run as the ``postgres`` user when the tests run as root), its SQLAlchemy URL;
    stopped at the end. ``.ci/run`` installs it when missing, so under CI its absence fails."""
    import tempfile

    from medvl.http.validate import free_port

    binaries = Path("/usr/lib/postgresql")
    found = sorted(binaries.glob("*/bin/pg_ctl")) if binaries.is_dir() else []
    if not found:
        why = "needs Debian's postgresql (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs it")
        pytest.skip(why)
    bindir = found[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="medvl-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = folder / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "medvl"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://medvl@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
