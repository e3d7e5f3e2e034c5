"""The forms a model is served in, and the one place that decides which form and folder.

Phase 7 evaluates, phase 8 and the server serve, and the CLI answers with what
:func:`profile_form` and :func:`model_dir` say, so the quality the report states is the
quality users get.

- ``bf16``: the checkpoint as saved, in full precision (bf16 on a GPU, float32 on a CPU).
- ``awq``: phase 4's AWQ checkpoint (llm-compressor, compressed-tensors W4A16), 4-bit in
  memory, served by the project's W4A16 layers (:mod:`medvl.model.w4a16`: a Triton kernel for
  decoding steps, dequantize + cuBLAS for prefills).
- ``nf4``: the bitsandbytes NF4 checkpoint (phase 4's fallback); decodes eagerly, uncompiled.
- ``int4``: a full-precision checkpoint rounded to int4 at start-up, no calibration; the same
  W4A16 layers as ``awq``.
- ``fp8``: a full-precision checkpoint made W8A8 float8 at start-up (per-row weight scales,
  per-token activation scales; :mod:`medvl.model.fp8`), on FP8 tensor cores where the GPU has
  them (Ada, Hopper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medvl.core.io import read_json
from medvl.core.settings import LOAD_TIME_FORMS, Settings
from medvl.core.workdir import Workdir

FORMS = {
    "bf16": "full precision",
    "awq": "AWQ int4 (llm-compressor checkpoint, W4A16 Triton kernel)",
    "nf4": "NF4 (bitsandbytes checkpoint)",
    "int4": "round-to-nearest int4 at load (W4A16 Triton kernel)",
    "fp8": "float8 e4m3 W8A8 at load (dynamic per-token activation scales, torch._scaled_mm)",
}



# Phase 4's method (quantization_info.json) -> the form its checkpoint is served in.
METHOD_FORMS = {"awq": "awq", "bnb-nf4": "nf4"}


class FormError(RuntimeError):
    """The form cannot be decided or its model is missing; the message says what to run."""


def profile_form(settings: Settings, wd: Workdir) -> str:
    """The form the profile serves: full precision when ``quant.serve_quantized`` is off, else
    the 4-bit method phase 4 chose (AWQ when it succeeded, NF4 when it fell back)."""
    if not settings.quant.serve_quantized:
        return "bf16"
    info = wd.bench("quantization_info")
    if not info.is_file():
        raise FormError(f"{info} is missing: phase 4's 4-bit method decides the served form; run phase 4")
    return METHOD_FORMS[read_json(info)["method"]]


def form_of(folder: Path) -> str:
    """The form a saved folder is in, from its config: AWQ (compressed-tensors), NF4
    (bitsandbytes) or full precision (anything else, a LoRA adapter folder included)."""
    config = folder / "config.json"
    method = (read_json(config).get("quantization_config") or {}).get("quant_method") if config.is_file() else None
    return {"compressed-tensors": "awq", "bitsandbytes": "nf4"}.get(method, "bf16")


def choose(settings: Settings, wd: Workdir, weights: str, model: str) -> tuple[Path, str, str]:
    """The one answer to "which model, in which form" for the server, the CLI and phase 8:
    ``model`` is a folder or one of best (fine-tuned if phase 7 ran, else base), base,
    finetuned; ``weights`` a form or "auto" (a folder's own form; for the pipeline's models,
    the profile's). Returns the folder, its kind (finetuned, base or custom) and the form."""
    if model not in ("best", "base", "finetuned"):
        folder = Path(model)
        if not folder.is_dir():
            raise FormError(f"model {model!r}: not a folder nor one of best, base, finetuned")
        return folder, "custom", form_of(folder) if weights == "auto" else weights
    form = profile_form(settings, wd) if weights == "auto" else weights
    if model == "best":
        return (*served_model_dir(settings, wd, form), form)
    folder = model_dir(settings, wd, form, finetuned=model == "finetuned")
    if not (folder / "config.json").is_file():
        raise FormError(f"no {model} model in form {form} at {folder}: run the pipeline first")
    return folder, model, form


def model_dir(settings: Settings, wd: Workdir, form: str, finetuned: bool) -> Path:
    """The folder of the base or fine-tuned model in ``form`` (``int4`` and ``fp8`` are made
    from the full-precision one at load)."""
    base, tuned = {
        **{form: (wd.base_model_dir, wd.merged_model_dir) for form in ("bf16", *LOAD_TIME_FORMS)},
        "awq": (wd.awq_model_dir, wd.finetuned_awq_dir),
        "nf4": (wd.nf4_model_dir, wd.finetuned_nf4_dir),
    }[form]
    return (tuned if finetuned else base)(settings)


def served_model_dir(settings: Settings, wd: Workdir, form: str) -> tuple[Path, str]:
    """What to serve in ``form``: the fine-tuned model when phase 7 produced it, else the base;
    with its kind ("finetuned" or "base")."""
    for finetuned, kind in ((True, "finetuned"), (False, "base")):
        folder = model_dir(settings, wd, form, finetuned)
        if (folder / "config.json").is_file():
            return folder, kind
    raise FormError(f"no {form} model under {wd.models}: run the pipeline (phase 4 for the base, "
                    f"phase 7 for the fine-tuned model) or pass a model folder")


def load_in_form(folder: Path, settings: Settings, form: str) -> Any:
    """Load ``folder`` in ``form`` for inference (the server's, phase 7's and phase 4's loader)."""
    from medvl.model.loading import load_model

    if form == "awq":
        from medvl.model.int4 import load_awq_model

        return load_awq_model(folder, settings)
    model = load_model(folder, settings)  # an NF4 checkpoint carries its quantization config
    if form in LOAD_TIME_FORMS:
        from medvl.model.fp8 import fp8_dynamic
        from medvl.model.fusion import fuse_projections
        from medvl.model.int4 import int4_weight_only

        fuse_projections(model)  # before quantizing: the decoder's fused matmuls get the new weights
        {"int4": int4_weight_only, "fp8": fp8_dynamic}[form](model)
    return model
