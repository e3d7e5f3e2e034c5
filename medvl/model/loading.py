"""Loading a Qwen2.5-VL model and its processor the same way everywhere.

Benchmarks, training, evaluation and the API all load through here, so the pixel budget,
padding side, attention kernel and precision rules are decided once.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from medvl.core.settings import Settings
from medvl.model.vision import batch_window_attention

log = logging.getLogger(__name__)


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def attention_implementation(settings: Settings) -> str:
    """flash_attention_2 on a GPU when installed, else PyTorch SDPA (also on the CPU)."""
    choice = settings.model.attn_implementation
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def half_dtype() -> tuple[torch.dtype, str]:
    """FP16 as the seed asks, except where it is unsafe.

    Qwen2.5-VL was trained in bf16 and float16's narrow range risks overflow (inf/NaN) in
    its activations, so on GPUs that support bf16 we use bf16, which costs the same memory,
    and record why.
    On a CPU half precision is slow and poorly supported: float32, labelled as such.
    """
    if not torch.cuda.is_available():
        return torch.float32, "float32 (CPU: half precision not used)"
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bfloat16 (Qwen2.5-VL is trained in bf16 and float16 risks overflow; same memory as FP16)"
    return torch.float16, "float16"


def load_processor(model_dir: Path, settings: Settings | None, padding_side: str = "left") -> Any:
    """The processor with the profile's pixel budget (or, with ``settings`` None, the budget
    saved beside the model: a fine-tuned model is served with the budget it was trained on).
    Left padding by default, for batched generation."""
    from transformers import AutoProcessor

    pixels = {} if settings is None else {"min_pixels": settings.model.min_pixels,
                                          "max_pixels": settings.model.max_pixels}
    processor = AutoProcessor.from_pretrained(model_dir, **pixels)
    processor.tokenizer.padding_side = padding_side
    return processor


def bnb_nf4_config(compute_dtype: torch.dtype, double_quant: bool = True) -> Any:
    """NF4 with the vision tower and lm_head left in full precision.

    The vision tower is small (0.67 B of 8.3 B) and sensitive to quantization; lm_head holds
    the 152 k-way output distribution. Both stay unquantized, as in the seed.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        # transformers 5 matches these as name prefixes ("model.visual"); 4.x as substrings.
        llm_int8_skip_modules=["model.visual", "visual", "lm_head"])


def load_model(model_dir: Path, settings: Settings, quantization: str = "none",
               dtype: torch.dtype | None = None, device_map: Any = None, batched_vision: bool = True) -> Any:
    """Load for inference or training: ``quantization`` is "none" or "nf4".

    ``device_map`` defaults to "auto" on a GPU (layers spread over what is visible); a
    data-parallel rank passes its own device so each process holds a whole copy.
    ``batched_vision`` runs the vision tower's attention windows in one kernel per layer
    (:mod:`medvl.model.vision`; the same function); perf baselines turn it off to measure plain
    transformers.
    """
    from transformers import AutoModelForImageTextToText

    if dtype is None:
        dtype = half_dtype()[0]
    # safetensors only (no pickle), and never trust_remote_code: the model code is transformers'.
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention_implementation(settings),
                              "use_safetensors": True}
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    if quantization == "nf4":
        compute = torch.bfloat16 if (not torch.cuda.is_available() or torch.cuda.is_bf16_supported()) else torch.float16
        kwargs["quantization_config"] = bnb_nf4_config(compute, settings.quant.nf4_double_quant)
        if not torch.cuda.is_available():
            kwargs.setdefault("device_map", {"": "cpu"})
    elif quantization != "none":
        raise ValueError(f"unknown quantization {quantization!r}")
    log.info("loading %s (%s, %s, attention %s)", model_dir, quantization, dtype, kwargs["attn_implementation"])
    model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs)
    if batched_vision:
        batch_window_attention(model)
    model.eval()
    return model


def input_device(model: Any) -> torch.device:
    """Where inputs go: the embedding's device (device_map may spread layers)."""
    return model.get_input_embeddings().weight.device
