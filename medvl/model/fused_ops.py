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
graph or two for every page size and chunk; a vision block is one function, whole; a few seconds at start-up, before traffic), called by the
modules :func:`fuse_elementwise` rewrites. Inside the compiled decoding step they are inlined
and compiled with the rest. Same functions as transformers' (``tests/test_fused_ops.py``); a
GPU only, where the decoding step compiles too (``medvl.engine.slot_cache.should_compile``).

Measured on H100s (``bench/check_fused_ops.py``, ``bench/device/gpu_fused_ops.sh``): the
per-operation kernels took a page's vision tower from 18.0 to 11.6 ms of kernel time and the
mixed workload at 32 clients from 12.64 to 15.12 requests/s in one call; each vision block as
one compiled function (:func:`vision_block`) then 11.6 -> 9.9 ms and 14.28 -> 14.88 requests/s in
another, and the tower is faster by the wall clock too (38.5 against the eager 54.0 ms a page).
The logits' relative L2 from the same weights in float32: 0.038, the eager kernels' 0.047.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils.generic import is_flash_attention_requested

from medvl.model.fusion import _FusedGateUpMLP, _FusedQKVAttention
from medvl.model.vision import _BatchedWindowVisionAttention, segment_plan

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


def vision_block(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, index: torch.Tensor,
                 key_mask: torch.Tensor, real_rows: torch.Tensor, weights: tuple[torch.Tensor | None, ...],
                 eps: float, heads: int, scaling: float) -> torch.Tensor:
    """A whole vision block (Qwen2_5_VLVisionBlock with the batched windows of
    :mod:`medvl.model.vision`): norm, q/k/v, rotary, attention within each segment (``index``,
    ``key_mask``, ``real_rows``: :func:`medvl.model.vision.segment_plan`), projection and residual,
    then norm, SiLU-gated MLP and residual. ``weights``: norm1, qkv (weight, bias), proj (weight,
    bias), norm2, gate, up, down (weight, bias each).

    Why one function: compiled, the tower is 32 calls a page instead of ~350 eager kernels and
    Python calls, and the segment gathers and residual adds fuse with their neighbours."""
    norm1, qkv_w, qkv_b, proj_w, proj_b, norm2, gate_w, gate_b, up_w, up_b, down_w, down_b = weights
    seq = h.shape[0]
    q, k, v = F.linear(rms_norm(h, norm1, eps), qkv_w, qkv_b).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary_vision(q, k, cos, sin)
    segments, width = index.shape

    def padded(t: torch.Tensor) -> torch.Tensor:  # [seq, heads, dim] -> [segments, heads, width, dim]
        return t.transpose(0, 1)[:, index].permute(1, 0, 2, 3)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=key_mask, scale=scaling)
    out = out.permute(0, 2, 1, 3).reshape(segments * width, heads, -1).index_select(0, real_rows)
    h = h + F.linear(out.reshape(seq, -1), proj_w, proj_b)
    x = rms_norm(h, norm2, eps)
    return h + F.linear(silu_gate(F.linear(x, gate_w, gate_b), F.linear(x, up_w, up_b)), down_w, down_b)


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
        self.vision_block = build(vision_block)


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


class _FusedVisionBlock(qwen.Qwen2_5_VLVisionBlock):
    """The vision block as one :func:`vision_block` call (its modules keep their parameters)."""

    kernels: Kernels

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        attn, mlp = self.attn, self.mlp
        weights = (self.norm1.weight, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                   self.norm2.weight, mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight,
                   mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias)
        cos, sin = position_embeddings
        return self.kernels.vision_block(hidden_states, cos, sin, *segment_plan(cu_seqlens), weights,
                                         self.norm1.variance_epsilon, attn.num_heads, attn.scaling)


def _whole_block(block: Any) -> bool:
    """A vision block :func:`vision_block` computes: batched windows (no flash-attn), plain
    linear layers, a SiLU-gated MLP, the same epsilon in both norms."""
    linears = (block.attn.qkv, block.attn.proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj)
    return (isinstance(block.attn, _BatchedWindowVisionAttention) and not is_flash_attention_requested(block.attn.config)
            and all(type(m) is torch.nn.Linear for m in linears) and _is_silu(block.mlp.act_fn)
            and block.norm1.variance_epsilon == block.norm2.variance_epsilon)


def fuse_elementwise(model: Any, compiled: bool, backend: str = "inductor") -> int:
    """Rewrite, in place, every RMSNorm, SiLU-gated MLP (the language model's once its gate/up
    are fused: :func:`medvl.model.fusion.fuse_projections` first), rotary embedding and vision
    block (whole, :func:`vision_block`) of ``model`` to call :class:`Kernels` (``compiled``:
    through ``torch.compile`` with ``backend``); returns the modules rewritten. Serving only, and idempotent:
    parameters and state-dict names are untouched."""
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
        elif kind in (qwen.Qwen2_5_VLVisionBlock, _FusedVisionBlock) and _whole_block(module):
            module.__class__, module.kernels = _FusedVisionBlock, kernels
        else:
            continue
        rewritten += 1
    return rewritten


def _is_silu(act_fn: Any) -> bool:
    """Qwen2.5-VL's MLPs gate with SiLU; another activation keeps its module as it is."""
    return isinstance(act_fn, (SiLUActivation, torch.nn.SiLU))
