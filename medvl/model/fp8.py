"""FP8 served weights (W8A8): the language model's linear layers in float8 e4m3, made at load
from a full-precision checkpoint, with activations quantized per row at every call.

Why FP8 beside AWQ's W4A16: a W4A16 layer reads a quarter of bf16's bytes but still multiplies
in bf16 (its prefills dequantize the weight first), so a batch of 32 decoding rows or a page's
prefill is bound by bf16 tensor-core throughput. Hopper's FP8 tensor cores run twice as many
operations a second and an FP8 weight is half bf16's bytes, so W8A8 pays at every batch size,
where 4 bits pay only when reading weights is all a step does. The accuracy cost is measured,
not assumed: phase 4 puts its logits error against full precision beside AWQ's, phase 7 (where
``bench.compare_forms`` names it) scores it against the merged model with a paired interval.

The scheme is the one vLLM and torchao call "FP8 dynamic, per-channel weights, per-token
activations":
- weight: one float32 scale per output row, s_w = max|w_row| / 448, codes w / s_w in e4m3;
- input: one scale per row at every call, s_x = max|x_row| / 448, codes x / s_x in e4m3;
- y = (x_codes @ w_codes^T) * s_x * s_w^T (+ bias), accumulated in float32 by
  ``torch._scaled_mm`` on GPUs with FP8 tensor cores (compute capability 8.9 and later).

Elsewhere (a CPU, an older GPU) the layer computes the same quantized product from the codes
upcast to float32 (:meth:`Fp8Linear.emulated`): the same rounding of weights and inputs, so the
CPU tests check the scheme's error, and the GPU check compares the kernel with it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from medvl.model.int4 import language_linear, replace_module

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE_FLOOR = 1e-12  # a row of zeros gets a scale that divides by it without overflow
ALIGNMENT = 16  # torch._scaled_mm wants both matrix widths in multiples of 16


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of ``t`` [rows, n] as e4m3 codes and one float32 scale ([rows, 1]) such that
    codes * scale ~= row: the row's largest magnitude maps to 448, e4m3's largest value."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=SCALE_FLOOR) / FP8_MAX
    codes = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale


def fp8_kernel_available(device: torch.device) -> bool:
    """Whether ``device`` multiplies e4m3 natively (CUDA compute capability 8.9: Ada, Hopper, later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """A linear layer with an e4m3 weight and a float32 scale per output row; inputs quantized
    per row at each call (see the module docstring for the scheme)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        codes, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]: as _scaled_mm takes it
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.out_features, self.in_features = codes.shape
        self.use_kernel = fp8_kernel_available(codes.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn W8A8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        codes, scale = quantize_rows(rows)
        if self.use_kernel:
            y = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                                 out_dtype=x.dtype)
        else:
            y = self.emulated(codes, scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def emulated(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The quantized product in float32 from upcast codes: what the kernel computes, up to
        the order its float32 accumulation adds in."""
        return (codes.float() @ self.weight.float().t()) * scale * self.weight_scale


def fp8_dynamic(model: Any) -> int:
    """The language model's linear layers (fused or not; the vision tower and lm_head stay full
    precision, as for int4) made :class:`Fp8Linear`, in place. Layers whose widths are not
    multiples of 16 stay as they are (none in Qwen2.5-VL's or the stand-ins'). Returns the
    number of layers converted."""
    count = 0
    for name, module in list(model.named_modules()):
        if language_linear(module, name):
            if module.in_features % ALIGNMENT or module.out_features % ALIGNMENT:
                log.warning("%s stays full precision: widths %d x %d are not multiples of %d", name,
                            module.in_features, module.out_features, ALIGNMENT)
                continue
            replace_module(model, name, Fp8Linear(module))
            count += 1
    return count
