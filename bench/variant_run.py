"""A run of the pipeline beside a finished one, with other settings from phase 5 on: phases 1-4
(and the pages phase 5 already read by OCR) copied from the finished run, the later phases run
where their gates fail. The experiments that compare two runs on the same test split use it
(bench/ocr_grounded_prompt.py, bench/review_loop.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from medvl.core.io import read_json
from medvl.core.settings import Settings, load_settings
from medvl.core.workdir import REPO_ROOT, Workdir
from medvl.pipeline.gates import PHASES, check_phase
from medvl.pipeline.runner import PhaseError, log


def variant_run(settings: Settings, wd: Workdir, folder: Path, extra: list[str], last_phase: int = 7) -> Workdir:
    """Phases 1-``last_phase`` with ``extra`` overrides (after the run's own) in ``folder``, on a
    copy of phases 1-4 of ``wd``; a finished ``folder`` is reused as it is."""
    overrides = [*settings.overrides, *extra]
    variant = load_settings(settings.profile, overrides)
    target = Workdir.at(str(folder))
    if not check_phase(last_phase, target, variant):
        log.info("%s already holds a finished run with these settings: reused", folder)
        return target
    quantized = read_json(wd.bench("quantization_info"))["output_dir"]
    copied = [rel for number in range(1, 5) for rel in PHASES[number].outputs]
    copied += [str(wd.base_model_dir(settings).relative_to(wd.root)), quantized, "datasets/test_images",
               "datasets/ocr_cache"]
    for rel in copied:  # what DIR lacks (a DIR that ran before keeps its own)
        if (wd.root / rel).exists() and not (folder / rel).exists():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (wd.root / rel).is_dir() else shutil.copy2)(wd.root / rel, folder / rel)
    sets = [arg for item in overrides for arg in ("--set", item)]
    for number in range(1, last_phase + 1):  # only the phases whose gates fail (--from would redo all after)
        if not check_phase(number, target, variant):
            continue
        command = [str(REPO_ROOT / "run_pipeline.sh"), "--profile", settings.profile, "--workdir", str(folder),
                   "--only", str(number), *sets]
        log.info("running %s", " ".join(command))
        result = subprocess.run(command, env={**os.environ, "MEDVL_PYTHON": sys.executable})
        if result.returncode != 0:
            raise PhaseError(f"phase {number} of the run in {folder} failed (exit {result.returncode}); see its logs")
    return target
