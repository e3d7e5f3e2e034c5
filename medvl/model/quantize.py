"""Phase 4's 4-bit checkpoints: AWQ int4 through llm-compressor, bitsandbytes NF4 when it cannot run.

AWQ is the seed's first choice (4 bits, group 128, zero point). AutoAWQ is deprecated; vLLM's
llm-compressor took it over and maps AWQ for Qwen2.5-VL onto the language model only. Its
output is a compressed-tensors W4A16 checkpoint, the format vLLM and SGLang load with their
int4 kernels; this project serves it through its own W4A16 layers (:mod:`medvl.model.int4`).
Calibration runs the model on rendered training-generator pages (prompt and answer), from
seeds no other phase uses. When llm-compressor is missing or fails, the exact reason is
recorded and the fallback is bitsandbytes NF4 (double quantization, bf16 compute, vision
tower and lm_head in full precision), saved as a loadable 4-bit checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from medvl.core.io import atomic_dir, dir_size_bytes, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.medical.documents import CALIBRATION_SEED, corpus, render_document
from medvl.medical.prompts import TRAINING_PROMPTS
from medvl.model.compare import logits_agreement, next_token_logits
from medvl.model.forms import load_in_form
from medvl.model.loading import load_model, load_processor
from medvl.model.memory import (
    free_memory,
    memory_kind,
    peak_memory_mb,
    reset_peak_memory,
    unload,
    weights_footprint_mb,
)

log = logging.getLogger(__name__)

# Never quantized: lm_head (the 152 k-way output) and the vision tower (small and sensitive).
AWQ_IGNORE = ["lm_head", "re:.*visual.*"]
AWQ_LIBRARIES = ("llmcompressor", "compressed-tensors", "torch", "transformers")


class AwqUnavailable(RuntimeError):
    """AWQ could not run here; the message is the recorded reason."""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def awq_recipe(settings: Settings) -> list[Any]:
    """AWQ's scale search, then W4A16 asymmetric group quantization of every language-model
    linear layer (llm-compressor picks Qwen2.5-VL's layer mappings, language model only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    q = settings.quant
    weights = QuantizationArgs(num_bits=q.awq_w_bit, type="int", symmetric=not q.awq_zero_point,
                               strategy="group", group_size=q.awq_group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [AWQModifier(duo_scaling=True),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=AWQ_IGNORE)]


def calibration_rows(processor: Any, count: int, grounded: bool = False) -> list[dict[str, torch.Tensor]]:
    """``count`` model inputs, each one rendered page with a training prompt and its answer
    (the training format), from :data:`medvl.medical.documents.CALIBRATION_SEED`; with
    ``grounded`` (data.ocr_grounded_prompt) each prompt carries its page's OCR text, as the
    model is trained and served (its activations, which AWQ scales by, then include that text)."""
    docs = corpus(CALIBRATION_SEED, count, prefix="calib")
    prompts = [TRAINING_PROMPTS[i % len(TRAINING_PROMPTS)] for i in range(count)]
    if grounded:
        from medvl.medical import ocr
        from medvl.medical.documents import document_png
        from medvl.medical.prompts import ocr_grounded

        lines = ocr.read_pages([document_png(d) for d in docs], "OCR for grounded calibration prompts")
        prompts = [ocr_grounded(p, page_lines) for p, page_lines in zip(prompts, lines, strict=True)]
    rows = []
    for doc, prompt in zip(docs, prompts, strict=True):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": [{"type": "text", "text": doc.target_answer()}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        rows.append(dict(processor(text=[text], images=[render_document(doc)], return_tensors="pt")))
    return rows


@contextlib.contextmanager
def _llm_compressor_workarounds() -> Iterator[None]:
    """Two llm-compressor 0.14 behaviours, undone for the duration of one call:

    - its AWQ pins cached activations unconditionally, which fails without an NVIDIA driver
      ("Found no NVIDIA driver"); pinning only speeds GPU copies, so on a CPU it is skipped;
    - its sequential pipeline traces the model through code it executes with ``torch.fx.wrap``,
      which registers that code's namespace (the model included) in a torch.fx table for the
      life of the process: 7 GB of a 7B's GPU memory stayed allocated under every later load
      (measured on an H100). The entries it adds are removed afterwards.
    """
    from llmcompressor.pipelines.cache import IntermediatesCache
    from torch.fx import _symbolic_trace

    pin_memory = IntermediatesCache.pin_memory
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    wrapped_before = set(_symbolic_trace._wrapped_fns_to_patch)
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = pin_memory
        for key in set(_symbolic_trace._wrapped_fns_to_patch) - wrapped_before:
            del _symbolic_trace._wrapped_fns_to_patch[key]


def quantize_awq(model_dir: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """AWQ-quantize ``model_dir`` into ``out_dir`` (compressed-tensors W4A16 with its recipe);
    raises :class:`AwqUnavailable` with the reason when llm-compressor is missing or fails."""
    try:
        from llmcompressor import oneshot
        from llmcompressor.core import reset_session
        from torch.utils.data import DataLoader
    except Exception as exc:  # ImportError, or a version that breaks against this stack
        raise AwqUnavailable(f"llm-compressor cannot be imported: {_first_line(exc)}") from None
    versions = {name: importlib.metadata.version(name) for name in AWQ_LIBRARIES}
    reset_peak_memory()
    started = time.perf_counter()
    try:
        processor = load_processor(model_dir, settings)
        # Plain transformers modules (no batched vision windows): the pipeline traces the model.
        model = load_model(model_dir, settings, batched_vision=False)
        rows = calibration_rows(processor, settings.quant.awq_calibration_samples, settings.data.ocr_grounded_prompt)
        loader = DataLoader(rows, batch_size=1, collate_fn=lambda batch: batch[0])
        with _llm_compressor_workarounds():
            oneshot(model=model, processor=processor, dataset=loader, recipe=awq_recipe(settings),
                    num_calibration_samples=len(rows), sequential_targets=["Qwen2_5_VLDecoderLayer"])
        calibrate_s = time.perf_counter() - started
        with atomic_dir(out_dir) as partial:
            model.save_pretrained(partial, save_compressed=True)
            processor.save_pretrained(partial)
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        raise AwqUnavailable(f"llm-compressor AWQ failed: {_first_line(exc)} "
                             f"(at {Path(last.filename).name}:{last.lineno})") from None
    finally:
        reset_session()  # the session holds the calibrated model too
        model = None
        free_memory()
    tokens = [int(row["input_ids"].shape[1]) for row in rows]
    return {"time_s": time.perf_counter() - started, "calibrate_s": calibrate_s,
            "peak_memory_mb": peak_memory_mb(), "memory_kind": memory_kind(), "versions": versions,
            "calibration": {"documents": len(rows), "first_seed": CALIBRATION_SEED, "tokens": sum(tokens),
                            "tokens_per_document_max": max(tokens),
                            "source": "synthetic training-generator pages (prompt + answer), seeds of their own"},
            "quantization_config": read_json(out_dir / "config.json")["quantization_config"],
            "size_bytes": dir_size_bytes(out_dir)}


def save_nf4(model_dir: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Quantize to NF4 on load and save the 4-bit checkpoint (weights + config + processor)."""
    started = time.perf_counter()
    model = load_model(model_dir, settings, "nf4")
    with atomic_dir(out_dir) as partial:
        model.save_pretrained(partial, safe_serialization=True)
        load_processor(model_dir, settings).save_pretrained(partial)
    config = model.config.quantization_config.to_dict()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"time_s": time.perf_counter() - started, "quantization_config": config,
            "size_bytes": dir_size_bytes(out_dir)}


def quantize_in_form(form: str, model_dir: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """``model_dir`` (phase 7's merged model) made into the served form in ``out_dir``, as phase
    4 made the base: AWQ calibrated the same way, or NF4; full precision is served as it is."""
    if form == "awq":
        return quantize_awq(model_dir, out_dir, settings)
    if form == "nf4":
        return save_nf4(model_dir, out_dir, settings)
    return {"size_bytes": dir_size_bytes(model_dir)}


def quantize_base(settings: Settings, wd: Workdir) -> tuple[str, Path, dict, str | None]:
    """Phase 4's choice: AWQ when it can run, NF4 otherwise; the other method's folder is removed (never serve
    a stale one). Returns the method, its folder, what the quantizer reported, and why AWQ was
    not used (None when it was)."""
    base_dir = wd.base_model_dir(settings)
    awq_error = "AWQ disabled by quant.try_awq=false"
    if settings.quant.try_awq:
        try:
            done = quantize_awq(base_dir, wd.awq_model_dir(settings), settings)
            shutil.rmtree(wd.nf4_model_dir(settings), ignore_errors=True)
            return "awq", wd.awq_model_dir(settings), done, None
        except AwqUnavailable as exc:
            awq_error = str(exc)
            log.warning("AWQ not used: %s -> falling back to bitsandbytes NF4", awq_error)
    shutil.rmtree(wd.awq_model_dir(settings), ignore_errors=True)
    return "bnb-nf4", wd.nf4_model_dir(settings), save_nf4(base_dir, wd.nf4_model_dir(settings), settings), awq_error


def forms_agreement(settings: Settings, wd: Workdir, method: str, samples: list) -> dict:
    """Next-token logits of each 4-bit form against the full-precision model's, on the phase-3
    documents: the chosen method's checkpoint, and beside it NF4, round-to-nearest int4 and
    FP8 W8A8 made at load from the same base (AWQ only when phase 4 made it)."""
    base_dir = wd.base_model_dir(settings)
    processor = load_processor(base_dir, settings)
    loaders = {"full_precision": lambda: load_model(base_dir, settings),
               "int4_round_to_nearest": lambda: load_in_form(base_dir, settings, "int4"),
               "fp8_dynamic": lambda: load_in_form(base_dir, settings, "fp8"),
               "nf4": lambda: load_model(base_dir, settings, "nf4")}
    if method == "awq":
        loaders["awq_int4"] = lambda: load_in_form(wd.awq_model_dir(settings), settings, "awq")
    result, reference = {}, None
    for name, loader in loaders.items():
        model = None
        try:
            model = loader()
            logits = next_token_logits(model, processor, [(s.image_path, s.prompt) for s in samples])
        except RuntimeError as exc:  # a form this machine cannot run (e.g. fp8 without FP8 kernels): said, not fatal
            if reference is None or name == "awq_int4":
                raise  # the reference and phase 4's own checkpoint must run
            if model is not None:
                unload(model)
            log.warning("%s not compared: %s", name, exc)
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        footprint = weights_footprint_mb(model)
        unload(model)
        if reference is None:
            reference = logits
            result[name] = {"weights_footprint_mb": footprint}
            continue
        result[name] = {"weights_footprint_mb": footprint, **logits_agreement(logits, reference)}
        log.info("%s vs full precision: relative L2 of next-token logits mean %.4f, max %.4f; "
                 "same top token %d/%d; weights %.1f MB", name, result[name]["relative_l2_mean"],
                 result[name]["relative_l2_max"], result[name]["same_top_token"], len(samples), footprint)
    return result
