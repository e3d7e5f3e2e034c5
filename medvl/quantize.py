"""Phase 4: AWQ INT4 when it can run, bitsandbytes NF4 otherwise.

AutoAWQ is deprecated and does not import with transformers 5 on most installs, and it has
no Qwen2.5-VL support for the vision tower. The attempt is still real: it imports AutoAWQ,
quantizes with the seed's config, and records the exact error when any step fails. The
fallback is bitsandbytes NF4 (double quantization, bf16 compute, vision tower and lm_head
kept in full precision), saved as a loadable 4-bit checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from medvl.documents import corpus
from medvl.io import dir_size_bytes
from medvl.modeling import load_model, load_processor
from medvl.settings import Settings

log = logging.getLogger(__name__)


class AwqUnavailable(RuntimeError):
    """AWQ could not run here; the message is the recorded reason."""


def awq_quant_config(settings: Settings) -> dict[str, Any]:
    q = settings.quant
    return {"zero_point": q.awq_zero_point, "q_group_size": q.awq_group_size,
            "w_bit": q.awq_w_bit, "version": "GEMM"}


def try_awq(model_dir: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Quantize with AutoAWQ into ``out_dir``; raises :class:`AwqUnavailable` with the reason."""
    try:
        from awq import AutoAWQForCausalLM  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or AutoAWQ breaking against transformers 5
        raise AwqUnavailable(f"AutoAWQ cannot be imported: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not torch.cuda.is_available():
        raise AwqUnavailable("AutoAWQ needs a CUDA GPU for calibration; none is available")
    started = time.perf_counter()
    try:
        processor = load_processor(model_dir, settings)
        model = AutoAWQForCausalLM.from_pretrained(str(model_dir), safetensors=True, device_map="auto")
        calibration = [doc.text for doc in corpus(50_000, 64, prefix="calib")]
        model.quantize(processor.tokenizer, quant_config=awq_quant_config(settings), calib_data=calibration)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_quantized(str(out_dir))
        processor.save_pretrained(out_dir)
    except Exception as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        last = traceback.extract_tb(exc.__traceback__)[-1]
        raise AwqUnavailable(f"AutoAWQ failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                             f"(at {Path(last.filename).name}:{last.lineno})") from None
    return {"time_s": time.perf_counter() - started}


def save_nf4(model_dir: Path, out_dir: Path, settings: Settings) -> dict[str, Any]:
    """Quantize to NF4 on load and save the 4-bit checkpoint (weights + config + processor)."""
    started = time.perf_counter()
    model = load_model(model_dir, settings, "nf4")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    load_processor(model_dir, settings).save_pretrained(tmp)
    config = model.config.quantization_config.to_dict()
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # Swap in whole: a killed run never leaves a half-written checkpoint under the real name.
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {"time_s": time.perf_counter() - started, "quantization_config": config,
            "size_bytes": dir_size_bytes(out_dir)}


def int4_weight_only(model: Any, group_size: int = 128) -> int:
    """Serving-time int4 weight-only quantization (torchao, tinygemm kernels), in place.

    Why not bitsandbytes for serving: NF4 dequantizes every weight on every decoding step
    in eager kernels and cannot be captured in a CUDA graph, so batch-1 decoding is slower
    than bf16 (27 vs 46 tokens/s measured on an H100). torchao's int4 tensors pack weights for
    the tinygemm matmul and compile with the decoding step. NF4 stays the format for QLoRA.
    Only the language model's linear layers are quantized: the vision tower and lm_head stay
    in bf16, as with NF4. Needs a CUDA GPU (tinygemm has no CPU kernel in this format).
    Returns the number of layers quantized.
    """
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    if not torch.cuda.is_available():
        raise RuntimeError("int4 (torchao) serving needs a CUDA GPU; use quantization 'none' or 'nf4' on a CPU")

    def language_linear(module: torch.nn.Module, name: str) -> bool:
        return isinstance(module, torch.nn.Linear) and "visual" not in name and "lm_head" not in name

    count = sum(1 for name, module in model.named_modules() if language_linear(module, name))
    # set_inductor_config=False: torchao would otherwise switch on inductor's coordinate-descent
    # tuning process-wide, which made compiling the batch-8 decoding step take 120-214 s on an H100.
    quantize_(model, Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                          set_inductor_config=False),
              filter_fn=language_linear)
    return count
