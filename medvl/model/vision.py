"""The vision tower's windowed attention as one batched kernel per layer.

Why: without flash-attn, transformers 5.17 runs Qwen2.5-VL's vision attention one window at
a time (``modeling_qwen2_5_vl.py`` splits q/k/v by ``cu_seqlens`` and loops): ~1,100 SDPA
calls for one 640-token page. On an H100 that made the tower 71-78% of a page's prefill
(90 ms at batch 1 for ~3.4 TFLOP that the card computes in ~5 ms), and it runs in every
training step too. Here every segment of a layer (the 8x8-patch windows, or whole images in
the full-attention layers) is gathered into one padded ``[segments, heads, longest, dim]``
batch and attended in one SDPA call with a key-padding mask; padded query rows are dropped
on the way back. Same function: each query still attends to exactly the keys of its own
segment (``tests/test_vision.py`` checks the tower's output against transformers').

:func:`batch_window_attention` swaps the class of each vision attention module in place; it
adds no parameters and changes no state-dict names, so it applies to training, merging and
serving alike (``medvl.model.loading.load_model`` calls it for every model it loads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils.generic import is_flash_attention_requested

_PLANS: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


def _segment_plan(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gather index [segments, width], key mask [segments, 1, 1, width], flat positions of the
    real rows) for ``cu_seqlens``; computed once per tensor (its CPU syncs too), since every layer
    of a forward passes the same one or two tensors."""
    cached = _PLANS.get(id(cu_seqlens))
    if cached is not None and cached[0] is cu_seqlens:
        return cached[1]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = cu_seqlens[:-1][lengths > 0]
    lengths = lengths[lengths > 0]
    width = int(lengths.max())
    offsets = torch.arange(width, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]  # [segments, width]
    plan = (torch.where(valid, starts[:, None] + offsets[None, :], 0), valid[:, None, None, :],
            valid.flatten().nonzero().squeeze(1))
    if len(_PLANS) >= 8:  # a new forward: the previous one's tensors are gone
        _PLANS.clear()
    _PLANS[id(cu_seqlens)] = (cu_seqlens, plan)  # the reference keeps the id from being reused
    return plan


def segmented_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """Attention within each segment ``[cu_seqlens[i], cu_seqlens[i+1])`` of a packed sequence.

    ``query``/``key``/``value``: ``[heads, seq, dim]``; returns ``[seq, heads, dim]``. Segments
    are padded to the longest one and attended together; padding keys are masked out, padding
    query rows are computed and discarded.
    """
    index, key_mask, real_rows = _segment_plan(cu_seqlens)
    segments, width = index.shape

    def padded(t: torch.Tensor) -> torch.Tensor:  # [heads, seq, dim] -> [segments, heads, width, dim]
        return t[:, index].permute(1, 0, 2, 3)

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=key_mask, scale=scaling)
    # segments are contiguous and in order: the real rows, in order, are the packed sequence
    return out.permute(0, 2, 1, 3).reshape(segments * width, out.shape[1], out.shape[3]).index_select(0, real_rows)


class _BatchedWindowVisionAttention(qwen.Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention with all windows of a layer in one SDPA call.

    The forward is transformers 5.17's but for the non-flash branch (see the module docstring).
    """

    apply_rotary = staticmethod(qwen.apply_rotary_pos_emb_vision)  # medvl.model.fused_ops.fuse_elementwise: compiled

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs: Any) -> torch.Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        query, key = self.apply_rotary(query, key, cos, sin)
        out = segmented_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                  cu_seqlens, self.scaling)
        return self.proj(out.reshape(seq_length, -1))


def align_vision_mlp(model: Any, multiple: int = 64) -> int:
    """Pad each vision MLP's hidden width to a multiple of ``multiple`` with zeros, in place;
    returns how many MLPs were padded. Serving only: the state dict's shapes change.

    Why: Qwen2.5-VL-7B's vision MLP is 3,420 wide, not a multiple of 8, so cuBLAS cannot use its
    Hopper kernels for the gate/up/down matmuls and falls back to sm80 CUTLASS ones: on an H100
    they took 67 of a batch-8 prefill's 329 ms of GPU time (docs/results/h100/perf_prefill.json).
    Same function: a padded row of gate and up is zero (weights and bias), silu(0) * 0 = 0, and
    the matching down-projection columns are zero.
    """
    padded = 0
    for module in model.modules():
        if type(module) is not qwen.Qwen2_5_VLMLP or module.gate_proj.out_features % multiple == 0:
            continue
        width = module.gate_proj.out_features
        extra = -width % multiple
        for name in ("gate_proj", "up_proj"):
            old = getattr(module, name)
            new = torch.nn.Linear(old.in_features, width + extra, bias=old.bias is not None,
                                  device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:width] = old.weight
                if old.bias is not None:
                    new.bias.zero_()
                    new.bias[:width] = old.bias
            new.requires_grad_(False)
            setattr(module, name, new)
        old = module.down_proj
        new = torch.nn.Linear(width + extra, old.out_features, bias=old.bias is not None,
                              device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, :width] = old.weight
            if old.bias is not None:
                new.bias.copy_(old.bias)
        new.requires_grad_(False)
        module.down_proj = new
        module.intermediate_size = width + extra
        padded += 1
    return padded


def batch_window_attention(model: Any) -> int:
    """Swap every vision attention module of ``model`` to the batched form; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is qwen.Qwen2_5_VLVisionAttention:
            module.__class__ = _BatchedWindowVisionAttention
            swapped += 1
    return swapped
