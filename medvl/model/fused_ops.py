"""The layers' elementwise work (RMSNorm, SiLU-gated MLP, rotary embeddings) in fused kernels.

Why: the decoding step is compiled whole (``torch.compile`` fuses its elementwise work), but a
page's vision tower and the language model's prefill chunks run eagerly, and there
transformers' RMSNorm is seven kernels (cast, square, mean, add, rsqrt, multiply, cast back),
the vision rotary embedding about ten (float casts, two ``cat``-based half rotations), the MLP's
gate two over strided halves. On an H100 serving 7b-random's mixed workload at 32 clients
(``bench/profile_engine.py``, docs/results/h100/README.md) those unfused kernels took ~70% of the
vision tower's GPU time (~390 of its 570 ms in a 2-s trace, ~22 ms a page where its matrix
products and attention need ~7) and ~310 ms of the main stream's prefills, with the GPU busy
96% of the trace: they were the largest share of GPU time that no matrix product needed.

Here each of those is one small function compiled by ``torch.compile`` with dynamic shapes (a
graph or two for every page size and chunk; a few seconds at start-up, before traffic), called by the
modules :func:`fuse_elementwise` rewrites. Inside the compiled decoding step they are inlined
and compiled with the rest. Same functions as transformers' (``tests/test_fused_ops.py``); a
GPU only, where the decoding step compiles too (``medvl.engine.slot_cache.should_compile``).

Measured on an H100 (``bench/check_fused_ops.py``, ``bench/device/gpu_fused_ops.sh``): a page's
vision tower 18.0 -> 11.6 ms of kernel time, a page's whole forward pass 37.9 -> 27.4 ms, the
logits as close to the same weights in float32 as the eager kernels' (relative L2 0.0475
against 0.0473); the mixed workload at 32 clients 12.64 -> 15.12 requests/s in one call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from medvl.model.fusion import _FusedGateUpMLP, _FusedQKVAttention
from medvl.model.vision import _BatchedWindowVisionAttention

# --------------------------------------------------------------------------- the functions (transformers 5.17's math)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2_5_VLRMSNorm.forward: normalized in float32, cast back, then scaled."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The MLP's ``act_fn(gate) * up`` (Qwen2.5-VL's act_fn is SiLU in both towers)."""
    return F.silu(gate) * up


def silu_gate_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """:func:`silu_gate` on a fused gate/up projection's output (gate first, then up)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb (the language model's; cos/sin ``[batch, seq, dim]``, q/k ``[batch, heads, seq, dim]``)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rotary_vision(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary_pos_emb_vision: in float32, cast back (q/k ``[seq, heads, dim]``, cos/sin ``[seq, dim]``)."""
    qf, kf = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    return ((qf * cos + _rotate_half(qf) * sin).to(q.dtype), (kf * cos + _rotate_half(kf) * sin).to(k.dtype))


# --------------------------------------------------------------------------- the rewritten modules


class Kernels:
    """The functions the rewritten modules call, through ``torch.compile`` with ``backend``
    (inductor: fused kernels; a GPU) or, with None, plain (the same math, eagerly)."""

    def __init__(self, backend: str | None) -> None:
        def build(fn: Callable) -> Callable:
            # Not fullgraph: an input variant past dynamo's recompile limit then runs eagerly
            # instead of failing its request (each function traces as one graph:
            # tests/test_fused_ops.py; serving compiles none under traffic: bench/profile_engine.py).
            return torch.compile(fn, backend=backend, dynamic=True) if backend else fn

        self.backend = backend
        self.rms_norm = build(rms_norm)
        self.silu_gate = build(silu_gate)
        self.silu_gate_fused = build(silu_gate_fused)
        self.rotary = build(rotary)
        self.rotary_vision = build(rotary_vision)


@functools.cache
def kernels_for(backend: str | None) -> Kernels:
    """One :class:`Kernels` per backend for the process: every model rewritten here shares its
    compiled graphs (a new ``torch.compile`` wrapper per model would compile them again, and
    past dynamo's recompile limit run them eagerly)."""
    return Kernels(backend)


class _FusedRMSNorm(qwen.Qwen2_5_VLRMSNorm):
    kernels: Kernels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


class _FusedVisionMLP(qwen.Qwen2_5_VLMLP):
    kernels: Kernels

    def forward(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_gate(self.gate_proj(hidden_state), self.up_proj(hidden_state)))


class _FusedGateUpKernelMLP(_FusedGateUpMLP):
    kernels: Kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.kernels.silu_gate_fused(self.gate_up_proj(x)))


def fuse_elementwise(model: Any, compiled: bool, backend: str = "inductor") -> int:
    """Rewrite, in place, every RMSNorm, SiLU-gated MLP (the language model's once its gate/up
    are fused: :func:`medvl.model.fusion.fuse_projections` first) and rotary embedding of
    ``model`` to call :class:`Kernels` (``compiled``: through ``torch.compile`` with
    ``backend``); returns the modules rewritten. Serving only, and idempotent: parameters and state-dict names are untouched."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kernels = kernels_for(backend if compiled else None)
    rewritten = 0
    for module in base.modules():
        kind = type(module)
        if kind in (qwen.Qwen2_5_VLRMSNorm, _FusedRMSNorm):
            module.__class__, module.kernels = _FusedRMSNorm, kernels
        elif kind in (qwen.Qwen2_5_VLMLP, _FusedVisionMLP) and _is_silu(module.act_fn):
            module.__class__, module.kernels = _FusedVisionMLP, kernels
        elif kind in (_FusedGateUpMLP, _FusedGateUpKernelMLP) and _is_silu(module.act_fn):
            module.__class__, module.kernels = _FusedGateUpKernelMLP, kernels
        elif kind is _FusedQKVAttention:
            module.apply_rotary = kernels.rotary
        elif kind is _BatchedWindowVisionAttention:
            module.apply_rotary = kernels.rotary_vision
        else:
            continue
        rewritten += 1
    return rewritten


def _is_silu(act_fn: Any) -> bool:
    """Qwen2.5-VL's MLPs gate with SiLU; another activation keeps its module as it is."""
    return isinstance(act_fn, (SiLUActivation, torch.nn.SiLU))
