"""Fused q/k/v and gate/up projections for the language model's layers (serving only).

A batch-1 decoding step is ~200 matrix-vector products, each bound by reading its weight; the
small ones pay launch and ramp-up for little data. Fusing them is a change to the model, so it
lives with the model's forms (the int4 loader fills fused layers from their parts, the served
forms fuse a bf16 model); the slot cache's compiled step only runs the result.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen


def _concatenated(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer computing ``linears`` side by side (weights and biases concatenated)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if biases[0] is not None:
        fused.bias = torch.nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


def _plain_linears(*modules: Any, skeleton: bool = False) -> bool:
    """Only unquantized, unwrapped, resident layers are fused: not LoRA wrappers, 4-bit
    weights, or layers accelerate offloads (their weights live elsewhere until a hook loads them).
    A ``skeleton``'s layers are all on "meta": their weights are loaded after fusing."""
    return all(type(m) is torch.nn.Linear and type(m.weight) is torch.nn.Parameter
               and (skeleton or m.weight.device.type != "meta") and not hasattr(m, "_hf_hook") for m in modules)


def fused_layer_count(model: Any) -> int:
    """Language-model layers whose projections are fused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(isinstance(layer.self_attn, _FusedQKVAttention) for layer in base.model.language_model.layers)


# The fused layers and the layers each is made of, in output order.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def fuse_projections(model: Any, skeleton: bool = False) -> int:
    """Fuse every language-model layer's q/k/v and gate/up projections, in place.

    Why: a batch-1 decoding step is ~200 matrix-vector products, each bound by reading its
    weight; the small ones (k and v: 3.7 MB each at 7B) pay launch and ramp-up for little data.
    One q/k/v matmul and one gate/up matmul per layer read the same bytes in fewer, larger
    kernels. The model computes the same function afterwards (``generate`` works unchanged),
    but its state dict has the fused names: fuse a model for serving, never before saving.
    ``skeleton``: the model's weights are still on "meta" (a loader fills the fused layers from
    their parts, :mod:`medvl.model.int4`). Returns the number of layers fused (0 when already fused, quantized, LoRA-wrapped or offloaded).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = 0
    for layer in base.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not qwen.Qwen2_5_VLAttention or type(mlp) is not qwen.Qwen2MLP:
            continue
        qkv, gate_up = ([getattr(parent, name) for name in FUSED_PROJECTIONS[fused_name]]
                        for parent, fused_name in ((attn, "qkv_proj"), (mlp, "gate_up_proj")))
        if not _plain_linears(*qkv, *gate_up, skeleton=skeleton):
            continue
        attn.qkv_sizes = tuple(m.out_features for m in qkv)
        for parent, fused_name, parts in ((attn, "qkv_proj", qkv), (mlp, "gate_up_proj", gate_up)):
            setattr(parent, fused_name, _concatenated(parts))
            for name in FUSED_PROJECTIONS[fused_name]:
                delattr(parent, name)
        attn.__class__ = _FusedQKVAttention
        mlp.__class__ = _FusedGateUpMLP
        fused += 1
    return fused


class _FusedQKVAttention(qwen.Qwen2_5_VLAttention):
    """Qwen2.5-VL's text attention with one q/k/v matmul (see :func:`fuse_projections`).

    The forward is transformers 5.17's but for the projection; ``tests/test_decoding.py``
    checks the fused model's logits against the unfused model's.
    """

    qkv_sizes: tuple[int, int, int]
    apply_rotary = staticmethod(qwen.apply_rotary_pos_emb)  # medvl.model.fused_ops.fuse_elementwise: compiled

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.size()
        shape = (bsz, q_len, -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2)
                             for t in self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1))
        cos, sin = position_embeddings
        query, key = self.apply_rotary(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        interface = qwen.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                              qwen.eager_attention_forward)
        out, weights = interface(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, sliding_window=self.sliding_window,
                                 position_ids=position_ids, **kwargs)
        return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


class _FusedGateUpMLP(qwen.Qwen2MLP):
    """Qwen2's MLP with one gate/up matmul (see :func:`fuse_projections`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)
