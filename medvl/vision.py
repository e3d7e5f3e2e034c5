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
serving alike (``medvl.modeling.load_model`` calls it for every model it loads).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils.generic import is_flash_attention_requested


def segmented_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """Attention within each segment ``[cu_seqlens[i], cu_seqlens[i+1])`` of a packed sequence.

    ``query``/``key``/``value``: ``[heads, seq, dim]``; returns ``[seq, heads, dim]``. Segments
    are padded to the longest one and attended together; padding keys are masked out, padding
    query rows are computed and discarded.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    starts = cu_seqlens[:-1][lengths > 0]
    lengths = lengths[lengths > 0]
    width = int(lengths.max())
    offsets = torch.arange(width, device=query.device)
    valid = offsets[None, :] < lengths[:, None]  # [segments, width]
    index = torch.where(valid, starts[:, None] + offsets[None, :], 0)

    def padded(t: torch.Tensor) -> torch.Tensor:  # [heads, seq, dim] -> [segments, heads, width, dim]
        return t[:, index].permute(1, 0, 2, 3)

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value),
                                         attn_mask=valid[:, None, None, :], scale=scaling)
    return out.permute(0, 2, 1, 3)[valid]  # segments are contiguous and in order: back to [seq, heads, dim]


class _BatchedWindowVisionAttention(qwen.Qwen2_5_VLVisionAttention):
    """Qwen2.5-VL's vision attention with all windows of a layer in one SDPA call.

    The forward is transformers 5.17's but for the non-flash branch (see the module docstring).
    """

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs: Any) -> torch.Tensor:
        if is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        query, key = qwen.apply_rotary_pos_emb_vision(query, key, cos, sin)
        out = segmented_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                  cu_seqlens, self.scaling)
        return self.proj(out.reshape(seq_length, -1))


def batch_window_attention(model: Any) -> int:
    """Swap every vision attention module of ``model`` to the batched form; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is qwen.Qwen2_5_VLVisionAttention:
            module.__class__ = _BatchedWindowVisionAttention
            swapped += 1
    return swapped
