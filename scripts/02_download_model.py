#!/usr/bin/env python3
"""Phase 2: put the base model in models/<slug>-base/.

Profile 7b downloads Qwen/Qwen2.5-VL-7B-Instruct with huggingface_hub (resumable, only the
files loading needs). Stand-in profiles (tiny, small, 7b-random) build an architecture-faithful
model offline instead; with model.pretrain_steps (small) it is then pre-trained on reading
pages back (medvl/training/pretrain.py), so the base knows something as the real one does. Either way the folder is loaded with AutoProcessor and
AutoModelForImageTextToText before the phase passes. Writes benchmarks/model_download.json.
"""

import shutil
import time
from pathlib import Path

from medvl.core.io import append_build_log, atomic_write_json, dir_size_bytes
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.model import source as model_source
from medvl.model import standin
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase

PHASE = PHASES[2]


def pretrain_standin(model_dir: Path, settings: Settings, wd: Workdir) -> dict:
    """Pre-train the stand-in in place (medvl/training/pretrain.py); its pages are scratch."""
    from medvl.training import pretrain  # the trainer's imports, only for a profile that pre-trains

    pages = wd.models / f".{settings.model.slug}-pretrain-pages"
    shutil.rmtree(pages, ignore_errors=True)
    pages.mkdir(parents=True)
    try:
        return pretrain.pretrain(model_dir, settings, pages)
    except ValueError as exc:
        raise PhaseError(str(exc)) from None
    finally:
        shutil.rmtree(pages, ignore_errors=True)


def main(settings: Settings, wd: Workdir) -> dict:
    model_dir = wd.base_model_dir(settings)
    started = time.perf_counter()
    if settings.model.source == "hub":
        how = f"downloaded {settings.model.hub_id} from the hub"
        try:
            model_source.download_snapshot(settings.model.hub_id, model_dir)
        except model_source.HubUnavailable as exc:
            raise PhaseError(str(exc)) from None
        built = {}
    else:
        how = (f"built the offline `{settings.model.standin_architecture}` stand-in "
               "(random weights; hub not used)")
        # A stand-in is cheap to rebuild and has no partial state worth keeping.
        shutil.rmtree(model_dir, ignore_errors=True)
        built = standin.build_standin(
            model_dir, settings.model.standin_architecture, settings.model.standin_tokenizer,
            settings.model.standin_tokenizer_vocab,
            settings.model.min_pixels, settings.model.max_pixels, settings.model.seed)
        if settings.model.pretrain_steps:
            how += f", then pre-trained it {settings.model.pretrain_steps} steps on reading pages back"
            built["pretraining"] = pretrain_standin(model_dir, settings, wd)
    fetch_s = time.perf_counter() - started

    check = model_source.validate_loads(model_dir, settings)
    size = dir_size_bytes(model_dir)
    record = {
        **settings.record(PHASE.sections),
        "model_id": settings.model.hub_id,
        "source": settings.model.source,
        "standin": built or None,
        "model_dir": str(model_dir.relative_to(wd.root)),
        "size_bytes": size,
        "size_gb": round(size / 1e9, 4),
        "fetch_or_build_s": round(fetch_s, 2),
        "weight_files": model_source.weight_files(model_dir),
        **check,
    }
    atomic_write_json(PHASE.output(wd, "model_download.json"), record)
    log.info("%s: %.3f GB on disk, %.1f M parameters, %.1f s", model_dir.name, size / 1e9,
             check["parameters"] / 1e6, fetch_s)
    trained = (built or {}).get("pretraining")
    append_build_log(wd.build_log, PHASE.number, "base model", [
        f"{how.capitalize()} into `{model_dir.relative_to(wd.root)}` in {fetch_s:.1f} s.",
        *([f"Pre-training ({trained['prompt']}; {trained['pages']} pages, seeds {trained['document_seeds']}): "
           f"held-out answer-token accuracy {trained['held_out_before']['token_accuracy']:.3f} -> "
           f"{trained['held_out_after']['token_accuracy']:.3f} in {trained['train_s']:.0f} s on {trained['device']}."]
          if trained else []),
        f"Size on disk {size / 1e9:.3f} GB; {check['parameters'] / 1e6:.1f} M parameters; "
        f"loads with the Auto classes: {check['validated']} ({check['load_check_s']} s).",
    ])
    return record


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
