"""Fast greedy decoding: a static KV cache and one compiled decoding step.

Why this exists: plain ``model.generate`` spends most of each decoding step in Python (input
preparation, logits processors, stopping criteria, cache bookkeeping). At batch 1 on a 7B
model the GPU then waits on the CPU, and the speed swings with the host (10-46 tokens/s was
measured on one kind of H100). Here the prompt runs once, eagerly and at any length, into a
preallocated :class:`transformers.StaticCache`; every later step has the same shapes, so it
is compiled with ``torch.compile(mode="reduce-overhead")``, which replays it as one CUDA
graph. Compilation happens once per batch size in :meth:`StaticDecoder.warm_up` (the server
calls it before it accepts traffic), never inside a request.

It computes what plain greedy ``generate`` computes, step for step:

- the same position ids: Qwen2.5-VL's M-RoPE rows (``get_rope_index``) plus the text row
  from the attention mask, built exactly as ``generate`` builds them, then +1 per step;
- the same argmax over the same next-token logits (upcast to float32, as generate does),
  after the generation config's repetition penalty, which generate applies even when greedy
  (Qwen2.5-VL ships ``repetition_penalty=1.05``): every token id already in the row, prompt
  and padding included, has its logit divided (or, if negative, multiplied) by it;
- rows that produced an end-of-sequence token are fed the pad token afterwards.

Two changes make the compiled step cheaper without changing what it computes (at batch 1 a
step is bound by reading the weights, so every extra byte or kernel shows):

- :func:`fuse_projections`: each layer's q/k/v projections become one matmul and gate/up
  another (the same weights, concatenated): 4 weight matmuls per layer instead of 7;
- :func:`grouped_decode_attention`: attention for the one new token per row reads the KV
  cache once per key/value head, where transformers' SDPA path copies it for each of the
  query heads sharing it whenever an attention mask is present (always, with a static cache).

``tests/test_decoding.py`` checks identical tokens against ``generate`` on the tiny model on
the CPU; ``scripts/perf_inference.py`` checks next-token logits on the GPU, where random 7B
weights have near-ties and a flipped token alone proves nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- attention for one new token


DECODE_ATTENTION = "medvl_grouped_decode"


def grouped_decode_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over the cache, query heads grouped by KV head.

    Why: with a static cache the mask is never None, and transformers' SDPA path then expands
    each of Qwen2.5-7B's 4 key/value heads to its 7 query heads before the kernel: at ~1.3 k
    cached tokens that writes and reads ~37 MB per layer and token, ~1 GB per batch-1 step
    next to 14 GB of weights. Here the 7 queries of a KV head are one [7, head_dim] matrix
    against that head's cache. Numerics follow the fused kernels: scores and softmax in
    float32, probabilities rounded to the value dtype for the weighted sum. Prompts (more
    than one query position) go to SDPA unchanged.
    """
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses KV head h // group
    scores = torch.matmul(grouped.float(), key.float().transpose(2, 3)) * (scaling or dim**-0.5)
    if attention_mask is not None:  # [batch, 1, 1, cache]: True (or 0.0) where a row may attend
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, 1, heads, dim), None


AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # the same boolean mask as SDPA's


@contextlib.contextmanager
def _attention(text_config: Any, implementation: str) -> Any:
    """Use ``implementation`` for the language model inside the block, then restore it (the
    prompt and plain ``generate`` keep the model's own)."""
    previous = text_config._attn_implementation
    text_config._attn_implementation = implementation
    try:
        yield
    finally:
        text_config._attn_implementation = previous


# --------------------------------------------------------------------------- fused projections


def _concatenated(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear layer computing ``linears`` side by side (weights and biases concatenated)."""
    weight = torch.cat([m.weight.detach() for m in linears])
    biases = [m.bias for m in linears]
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=biases[0] is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if biases[0] is not None:
        fused.bias = torch.nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)
    return fused


def _plain_linears(*modules: Any) -> bool:
    """Only unquantized, unwrapped, resident layers are fused: not LoRA wrappers, 4-bit
    weights, or layers accelerate offloads (their weights live elsewhere until a hook loads them)."""
    return all(type(m) is torch.nn.Linear and type(m.weight) is torch.nn.Parameter
               and m.weight.device.type != "meta" and not hasattr(m, "_hf_hook") for m in modules)


def fused_layer_count(model: Any) -> int:
    """Language-model layers whose projections are fused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(isinstance(layer.self_attn, _FusedQKVAttention) for layer in base.model.language_model.layers)


def fuse_projections(model: Any) -> int:
    """Fuse every language-model layer's q/k/v and gate/up projections, in place.

    Why: a batch-1 decoding step is ~200 matrix-vector products, each bound by reading its
    weight; the small ones (k and v: 3.7 MB each at 7B) pay launch and ramp-up for little data.
    One q/k/v matmul and one gate/up matmul per layer read the same bytes in fewer, larger
    kernels. The model computes the same function afterwards (``generate`` works unchanged),
    but its state dict has the fused names: fuse a model for serving, never before saving.
    Returns the number of layers fused (0 when already fused, quantized, LoRA-wrapped or offloaded).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = 0
    for layer in base.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not qwen.Qwen2_5_VLAttention or type(mlp) is not qwen.Qwen2MLP:
            continue
        if not _plain_linears(attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            continue
        attn.qkv_sizes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        attn.qkv_proj = _concatenated([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.__class__ = _FusedQKVAttention
        mlp.gate_up_proj = _concatenated([mlp.gate_proj, mlp.up_proj])
        del mlp.gate_proj, mlp.up_proj
        mlp.__class__ = _FusedGateUpMLP
        fused += 1
    return fused


class _FusedQKVAttention(qwen.Qwen2_5_VLAttention):
    """Qwen2.5-VL's text attention with one q/k/v matmul (see :func:`fuse_projections`).

    The forward is transformers 5.17's but for the projection; ``tests/test_decoding.py``
    checks the fused model's logits against the unfused model's.
    """

    qkv_sizes: tuple[int, int, int]

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.size()
        shape = (bsz, q_len, -1, self.head_dim)
        query, key, value = (t.view(shape).transpose(1, 2)
                             for t in self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1))
        cos, sin = position_embeddings
        query, key = qwen.apply_rotary_pos_emb(query, key, cos, sin)
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


# --------------------------------------------------------------------------- the decoder


class PromptTooLong(ValueError):
    """The prompt plus the answer budget does not fit the static cache."""


@dataclass
class Decoded:
    """One batch's result: new tokens per row (through the end-of-sequence token, if any)."""

    sequences: list[list[int]]
    ttft_s: float
    latency_s: float
    step_logits: list[torch.Tensor] | None = None  # float32 [rows, vocab] per step, when kept


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_position_ids(model: Any, inputs: Any) -> torch.Tensor:
    """[4, batch, length] position ids, as ``generate`` prepares them for Qwen2.5-VL.

    Row 0 is the text position (attention-mask cumulative sum, 0 on padding); rows 1-3 are
    the temporal/height/width M-RoPE positions (equal to the text position for text-only
    prompts).
    """
    mask = inputs["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    grid = inputs.get("image_grid_thw")
    kinds = inputs.get("mm_token_type_ids")
    if grid is not None and kinds is not None:
        vision, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=kinds,
                                               image_grid_thw=grid, attention_mask=mask)
    else:
        vision = text.unsqueeze(0).expand(3, -1, -1)
    return torch.cat([text.unsqueeze(0), vision.to(text.device)], dim=0)


def _repeat_last_row(inputs: dict[str, Any], rows: int) -> dict[str, Any]:
    """Pad a batch to ``rows`` by repeating its last sample (outputs of copies are dropped).

    A compiled step exists per batch size, so odd batches are rounded up to a compiled size;
    decoding is memory-bound, so the extra rows cost little.
    """
    have = inputs["input_ids"].shape[0]
    if have == rows:
        return inputs
    extra = rows - have
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out and out[key] is not None:
            out[key] = torch.cat([out[key], out[key][-1:].expand(extra, -1)])
    grid = out.get("image_grid_thw")
    if grid is not None and grid.shape[0] > 0:
        # Each sample here carries one image: repeat the last image's patches and grid row.
        patches = int(grid[-1].prod())
        out["pixel_values"] = torch.cat([out["pixel_values"]] + [out["pixel_values"][-patches:]] * extra)
        out["image_grid_thw"] = torch.cat([grid] + [grid[-1:]] * extra)
    return out


class StaticDecoder:
    """Greedy decoding over a static KV cache, with the decoding step optionally compiled.

    ``batch_sizes`` are the batch sizes a compiled step is built for; a batch is padded up
    to the next one. Without compilation any batch size runs as is. The model's projections
    are fused in place (:func:`fuse_projections`) where its layers allow.
    """

    def __init__(self, model: Any, max_cache_len: int, compile_step: bool,
                 batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        self.model = model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        fuse_projections(self.base)
        self.fused_layers = fused_layer_count(self.base)  # fused here or before (int4 serving fuses first)
        self.max_cache_len = max_cache_len
        self.compiled = compile_step
        self.batch_sizes = tuple(sorted(batch_sizes))
        gen = self.base.generation_config
        eos = gen.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.repetition_penalty = float(gen.repetition_penalty or 1.0)
        self.device = self.base.get_input_embeddings().weight.device
        self._caches: dict[int, Any] = {}
        self._eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        self.step = (torch.compile(self._step, mode="reduce-overhead", fullgraph=True, dynamic=False)
                     if compile_step else self._step)
        self.compile_s: dict[int, float] = {}

    # ---- the one compiled function
    def _step(self, token: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
              cache: Any, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=token, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1, :].float()
        return self._pick(logits, seen), logits

    def _pick(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Greedy choice after the repetition penalty (``seen``: token ids already in each row)."""
        p = self.repetition_penalty
        if p != 1.0:
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        return logits.argmax(dim=-1)

    # ---- bookkeeping
    @property
    def description(self) -> str:
        """How this decoder runs, in words (for records, logs and /health)."""
        fused = ", fused projections" if self.fused_layers else ""
        return ("static cache, compiled step" if self.compiled else "static cache") + fused

    def rows_for(self, batch: int) -> int:
        """The batch size actually run for ``batch`` requests."""
        if not self.compiled:
            return batch
        for size in self.batch_sizes:
            if size >= batch:
                return size
        raise ValueError(f"batch of {batch} is larger than the largest compiled size {self.batch_sizes[-1]}")

    def _cache(self, rows: int) -> Any:
        from transformers import StaticCache

        if rows not in self._caches:
            self._caches[rows] = StaticCache(config=self.base.config, max_cache_len=self.max_cache_len)
        cache = self._caches[rows]
        cache.reset()
        return cache

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len + max_new_tokens <= self.max_cache_len

    # ---- decoding
    @torch.inference_mode()
    def generate(self, inputs: Any, max_new_tokens: int, stop_at_eos: bool = True,
                 keep_logits: bool = False, streamer: Any = None) -> Decoded:
        """Greedy-decode a left-padded batch (as the processor makes it).

        ``stop_at_eos=False`` decodes exactly ``max_new_tokens`` (benchmarks with random weights).
        """
        batch, prompt_len = inputs["input_ids"].shape
        if not self.fits(prompt_len, max_new_tokens):
            raise PromptTooLong(f"{prompt_len} prompt + {max_new_tokens} new tokens exceed the static cache "
                                f"of {self.max_cache_len}; raise decode.max_cache_len")
        rows = self.rows_for(batch)
        inputs = _repeat_last_row(dict(inputs), rows)
        position_ids = generation_position_ids(self.base, inputs)
        cache = self._cache(rows)
        mask = torch.ones(rows, self.max_cache_len, dtype=inputs["attention_mask"].dtype, device=self.device)
        mask[:, :prompt_len] = inputs["attention_mask"]
        if streamer is not None:
            streamer.put(inputs["input_ids"][:1].cpu())

        _sync(self.device)
        started = time.perf_counter()
        # Prefill: eager, any prompt length; fills the static cache.
        prompt = {k: v for k, v in inputs.items() if k != "attention_mask"}
        out = self.model(**prompt, attention_mask=mask[:, :prompt_len], position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()
        seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
        seen.scatter_(1, inputs["input_ids"], True)
        token = self._pick(logits, seen)
        seen.scatter_(1, token.unsqueeze(1), True)
        _sync(self.device)
        ttft = time.perf_counter() - started
        kept = [logits.clone()] if keep_logits else None
        tokens = [token]
        unfinished = ~torch.isin(token, self._eos) if stop_at_eos else torch.ones_like(token, dtype=torch.bool)
        if streamer is not None:
            streamer.put(token[:1].cpu())
        position = position_ids[..., -1:].clone()
        # The model keeps the last prompt's rope deltas and returns them from every forward; the
        # steps do not use them (positions are passed in), so clear them: a stale batch size
        # would otherwise fail the compiled step's guards and recompile it.
        self.base.model.rope_deltas = None
        # Once a batch size is compiled, evaluate only the guards that tell compiled entries apart:
        # full guard checks over ~200 (quantized) weight tensors cost CPU time on every step.
        stance = (torch.compiler.set_stance(skip_guard_eval_unsafe=True) if rows in self.compile_s
                  else contextlib.nullcontext())
        with stance, _attention(self.base.config.text_config, DECODE_ATTENTION):
            self._decode_steps(tokens, unfinished, position, mask, cache, seen, batch, max_new_tokens,
                               stop_at_eos, kept, streamer)
        generated = torch.stack(tokens, dim=1).cpu()
        _sync(self.device)
        latency = time.perf_counter() - started
        if streamer is not None:
            streamer.end()
        return Decoded(sequences=[self._trim(generated[i].tolist(), stop_at_eos) for i in range(batch)],
                       ttft_s=ttft, latency_s=latency,
                       step_logits=[t[:batch] for t in kept] if kept is not None else None)

    def _decode_steps(self, tokens: list[torch.Tensor], unfinished: torch.Tensor, position: torch.Tensor,
                      mask: torch.Tensor, cache: Any, seen: torch.Tensor, batch: int, max_new_tokens: int,
                      stop_at_eos: bool, kept: list[torch.Tensor] | None, streamer: Any) -> None:
        """Every token after the first: one (compiled) step each, appended to ``tokens``."""
        token = tokens[-1]
        for step in range(1, max_new_tokens):
            if stop_at_eos and step % 8 == 0 and not bool(unfinished[:batch].any()):
                break
            position += 1
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            nxt, logits = self.step(token.unsqueeze(1), position, mask, cache, seen)
            if kept is not None:
                kept.append(logits.clone())
            token = torch.where(unfinished, nxt, torch.full_like(nxt, self.pad_id))
            seen.scatter_(1, token.unsqueeze(1), True)
            if stop_at_eos:
                unfinished = unfinished & ~torch.isin(token, self._eos)
            tokens.append(token)
            if streamer is not None:
                streamer.put(token[:1].cpu())
                if stop_at_eos and not bool(unfinished[0]):
                    break

    def _trim(self, ids: list[int], stop_at_eos: bool) -> list[int]:
        """Cut after the first end-of-sequence token (what follows is padding)."""
        if stop_at_eos:
            for i, token in enumerate(ids):
                if token in self.eos_ids:
                    return ids[: i + 1]
        return ids

    def warm_up(self, inputs: Any, steps: int = 4) -> dict[int, float]:
        """Compile (and capture) the step for every batch size; returns seconds per size.

        Run once at start-up: the first call of each shape compiles, the next ones record the
        CUDA graph; after this no request pays for compilation.
        """
        sizes = self.batch_sizes if self.compiled else (1,)
        for rows in sizes:
            started = time.perf_counter()
            batch = _repeat_last_row(dict(inputs), rows) if rows >= inputs["input_ids"].shape[0] else inputs
            for _ in range(2):
                self.generate(batch, max_new_tokens=steps, stop_at_eos=False)
            self.compile_s[rows] = time.perf_counter() - started
            log.info("decode step for batch %d ready in %.1f s (%s)", rows, self.compile_s[rows],
                     "compiled" if self.compiled else "eager")
        return dict(self.compile_s)


def should_compile(choice: str, model: Any = None) -> bool:
    """``decode.compile``: "auto" compiles on a GPU only (CPU compilation costs more than it
    saves), and never a bitsandbytes 4-bit model (its kernels do not compile into one graph;
    int4 serving uses torchao instead)."""
    if model is not None and getattr(model, "is_loaded_in_4bit", False):
        return False
    if choice == "auto":
        return torch.cuda.is_available()
    return choice == "on"
