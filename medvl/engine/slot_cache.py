"""Fast greedy decoding over a KV cache of independent slots, with one compiled decoding step.

Why this exists: plain ``model.generate`` spends most of each decoding step in Python (input
preparation, logits processors, stopping criteria, cache bookkeeping). At batch 1 on a 7B
model the GPU then waits on the CPU, and the speed swings with the host (10-46 tokens/s was
measured on one kind of H100). Here prompts run eagerly, at any length, straight into
preallocated cache slots (in chunks, if the engine asks: :meth:`SlotDecoder.prefill`); every
later step has fixed shapes per batch bucket, so it is compiled with
``torch.compile(mode="reduce-overhead")`` and replayed as a CUDA graph. Compilation happens in :meth:`SlotDecoder.warm_up` (the server calls it before it
accepts traffic), never inside a request. Each slot keeps its own length and position, so the
serving engine (:mod:`medvl.engine.scheduler`) admits and ends requests one by one (continuous batching).

For each row it computes what plain greedy ``generate`` computes for that prompt alone:

- the same position ids: Qwen2.5-VL's M-RoPE rows (``get_rope_index``), built exactly as
  ``generate`` builds them, then +1 per step;
- the same argmax over the same next-token logits (upcast to float32, as generate does),
  after the generation config's repetition penalty, which generate applies even when greedy
  (Qwen2.5-VL ships ``repetition_penalty=1.05``): every token id already in the row has its
  logit divided (or, if negative, multiplied) by it.

Two changes make the compiled step cheaper without changing what it computes (at batch 1 a
step is bound by reading the weights, so every extra byte or kernel shows):

- :func:`medvl.model.fusion.fuse_projections`: each layer's q/k/v projections become one matmul and gate/up
  another (the same weights, concatenated): 4 weight matmuls per layer instead of 7;
- :func:`grouped_decode_attention`: attention for the one new token per row reads the KV
  cache once per key/value head, where transformers' SDPA path copies it for each of the
  query heads sharing it whenever an attention mask is present (always, with a cache of slots).

And one makes the eager prefill chunks and the vision tower cheaper on a GPU:
:func:`medvl.model.fused_ops.fuse_elementwise` runs their RMSNorms, MLP gates and rotary
embeddings as compiled kernels (the same math).

``tests/test_decoding.py`` and ``tests/test_engine.py`` check identical tokens against
``generate`` on the tiny model on the CPU; ``bench/perf_inference.py`` checks next-token
logits on the GPU, where random 7B weights have near-ties and a flipped token alone proves
nothing.
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

from medvl.model.fused_ops import fuse_elementwise
from medvl.model.fusion import fuse_projections, fused_layer_count
from medvl.model.vision import align_vision_mlp

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
    next to 14 GB of weights. Here the 7 queries of a KV head are 7 query rows of one SDPA call
    against that head's cache, read once, in its own dtype (an earlier form upcast the cache to
    float32 first: ~2 ms of a batch-32 step on an H100). The fused kernels keep scores and
    softmax in float32. Prompts (more than one query position) go to SDPA unchanged.
    """
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)  # head h uses KV head h // group
    # attention_mask: [batch, 1, 1, cache], True (or 0.0) where a row may attend; it applies to every query row
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           scale=scaling or dim**-0.5)
    return out.reshape(batch, 1, heads, dim), None


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


# --------------------------------------------------------------------------- the slot decoder


class PromptTooLong(ValueError):
    """The prompt plus the answer budget does not fit a cache slot."""


@dataclass
class Decoded:
    """One fixed batch's result: new tokens per row (through the end-of-sequence token, if any)."""

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


def bucket_sizes(slots: int, compiled: bool) -> tuple[int, ...]:
    """Batch sizes a decoding step runs at: powers of two up to ``slots``, and ``slots``.

    A running batch of n rows runs the smallest bucket >= n (the extra rows are idle slots):
    decoding is bound by reading the weights, so a few idle rows cost little, and a handful of
    CUDA graphs cover every batch size. Compiled, the smallest bucket is 2: the step is
    compiled once with a dynamic batch dimension (torch.compile specializes a size of 1, so a
    bucket of 1 would be a second compilation: 72 s of an H100's start-up for batch 1 alone,
    against 94 s for the dynamic one), and one row decodes beside an idle one.
    """
    sizes, size = [], 2 if compiled and slots > 1 else 1
    while size < slots:
        sizes.append(size)
        size *= 2
    return (*sizes, slots)


class _SlotCacheView:
    """What the model's attention layers see during one decoding step: ``update`` writes each
    row's new key/value at that row's own column and returns the first ``rows`` slots."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_at: torch.Tensor) -> None:
        self.keys, self.values, self.write_at = keys, values, write_at
        self.rows = torch.arange(write_at.shape[0], device=write_at.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        n = key.shape[0]
        keys[self.rows, :, self.write_at] = key[:, :, 0]
        values[self.rows, :, self.write_at] = value[:, :, 0]
        return keys[:n], values[:n]


class _ChunkCacheView:
    """What the attention layers see while prompt chunks are prefilled: each position writes its
    key/value at its (slot, column) (padding: in the scratch slot), and each row attends over its
    whole slot, its mask showing only the columns up to the position itself. Fixed shapes per
    chunk bucket, so the forward pass can be captured as a CUDA graph."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], token_slots: torch.Tensor,
                 token_columns: torch.Tensor, row_slots: torch.Tensor) -> None:
        self.keys, self.values = keys, values
        self.token_slots, self.token_columns, self.row_slots = token_slots, token_columns, row_slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.token_slots, :, self.token_columns] = key.transpose(1, 2)  # [rows, width, kv_heads, dim]
        values[self.token_slots, :, self.token_columns] = value.transpose(1, 2)
        return keys[self.row_slots], values[self.row_slots]


CHUNK_WIDTH = 128  # chunk widths are padded to a multiple of this: a handful of CUDA graphs cover every width
CHUNK_ROWS = (1, 2, 4, 8)  # rows of one chunk forward pass, padded to the next of these


def chunk_shape(rows: int, width: int) -> tuple[int, int]:
    """The bucket (rows, width) a chunk of ``rows`` prompts up to ``width`` positions runs in."""
    return next(n for n in (*CHUNK_ROWS, rows) if n >= rows), -(-width // CHUNK_WIDTH) * CHUNK_WIDTH


def chunk_groups(widths: list[int], tokens: int) -> list[tuple[int, int]]:
    """Consecutive rows grouped into chunk forward passes of at most ``CHUNK_ROWS[-1]`` rows whose
    padded bucket holds at most ``tokens`` positions (a single row always makes a group); returns
    ``(begin, end)`` ranges."""
    groups, begin = [], 0
    for i in range(1, len(widths) + 1):
        if i == len(widths) or i - begin == CHUNK_ROWS[-1] or _bucket_tokens(widths[begin:i + 1]) > tokens:
            groups.append((begin, i))
            begin = i
    return groups


def _bucket_tokens(widths: list[int]) -> int:
    rows, width = chunk_shape(len(widths), max(widths))
    return rows * width


class _ChunkGraph:
    """One chunk bucket's forward pass captured as a CUDA graph, with its static inputs.

    Why: an eager forward pass of the 7B language model costs ~40 ms of Python on the engine's
    thread while request threads hold the GIL (docs/results/h100: 349 prefills took 14.1 s of a
    28-s window), where the GPU needs ~22 ms for a page: the prefill was bound by the CPU. A
    replay is one launch."""

    def __init__(self, decoder: SlotDecoder, rows: int, width: int, pool: Any) -> None:
        hidden = decoder.base.get_input_embeddings().weight.shape[1]
        device, scratch = decoder.device, decoder.slots
        self.inputs = {
            "embeds": torch.zeros(rows, width, hidden, dtype=decoder.keys[0].dtype, device=device),
            "positions": torch.zeros(4, rows, width, dtype=torch.long, device=device),
            "token_slots": torch.full((rows, width), scratch, dtype=torch.long, device=device),
            "token_columns": torch.arange(width, device=device).expand(rows, -1).contiguous(),
            "row_slots": torch.full((rows,), scratch, dtype=torch.long, device=device),
            "last": torch.zeros(rows, dtype=torch.long, device=device),
        }
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            decoder._chunk_forward(**self.inputs)  # lazy initialisation outside the capture
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = decoder._chunk_forward(**self.inputs)

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name, tensor in inputs.items():
            self.inputs[name].copy_(tensor, non_blocking=True)
        self.graph.replay()
        return self.logits


@dataclass
class PromptRow:
    """One prompt on the model's device, ready to prefill (in one piece or in chunks)."""

    embeds: torch.Tensor  # [length, hidden]: token embeddings, image embeddings in the image tokens' places
    positions: torch.Tensor  # [4, length]: text position, then the three M-RoPE rows (as generate builds them)
    ids: torch.Tensor  # [length]: token ids (seen, for the repetition penalty)

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])


def split_rows(inputs: dict[str, torch.Tensor], image_token_id: int, merge: int) -> list[dict[str, torch.Tensor]]:
    """A left-padded processor batch as one unpadded prompt per row, each with its own images
    (``image_grid_thw`` rows, ``pixel_values`` patches or ``image_embeds`` rows, in row order)."""
    ids, mask = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
    kinds = inputs["mm_token_type_ids"].cpu() if "mm_token_type_ids" in inputs else None
    grids = inputs["image_grid_thw"].cpu() if "image_grid_thw" in inputs else None
    image = patch = embed = 0
    rows = []
    for i in range(ids.shape[0]):
        row = {"input_ids": ids[i][mask[i]][None]}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if kinds is not None:
            row["mm_token_type_ids"] = kinds[i][mask[i]][None]
        tokens, first = int((row["input_ids"] == image_token_id).sum()), image
        while tokens > 0:
            tokens -= int(grids[image].prod()) // merge**2
            image += 1
        if image > first:
            row["image_grid_thw"] = grids[first:image]
            patches = int(row["image_grid_thw"].prod(-1).sum())
            if "pixel_values" in inputs:
                row["pixel_values"], patch = inputs["pixel_values"][patch:patch + patches], patch + patches
            if "image_embeds" in inputs:
                n = patches // merge**2
                row["image_embeds"], embed = inputs["image_embeds"][embed:embed + n], embed + n
        rows.append(row)
    return rows


class SlotDecoder:
    """A KV cache of ``slots`` rows, each with its own length and position, and one decoding step.

    Why slots: continuous batching needs rows that start and end independently. Each slot keeps
    its own write column, M-RoPE position, attention mask over the cache, and the token ids it
    has seen (for the repetition penalty), so a request can be prefilled into a free slot while
    others are mid-answer, and leave without waiting for them. The rows of a step are slots
    ``0..n-1``; the engine keeps running requests packed there (:meth:`move`).

    What a row computes is what plain greedy ``generate`` computes for that prompt alone:

    - the prompt runs eagerly (any length, in chunks if asked; several prompts side by side) and
      writes its keys and values straight into its slot; positions are built as ``generate``
      builds them (Qwen2.5-VL's M-RoPE rows from ``get_rope_index``, on the CPU), then +1 per step;
    - each step's logits are float32, after the generation config's repetition penalty (Qwen2.5-VL
      ships 1.05, which greedy ``generate`` applies): every token id already in the row has its
      logit divided (or, if negative, multiplied) by it; padding is not counted as seen, so a row
      prefilled beside longer prompts sees what it would see alone;
    - a step's attention covers exactly the row's own filled columns (a boolean mask per slot).

    The step is the one compiled function (``torch.compile``, ``reduce-overhead``: replayed as
    a CUDA graph): one graph per bucket of :func:`bucket_sizes`, compiled in :meth:`warm_up`,
    never inside a request.
    """

    def __init__(self, model: Any, max_cache_len: int, slots: int, compile_step: bool, chunk_tokens: int = 2048) -> None:
        self.model = model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Serving-only rewrites (same function, other parameter shapes: never save after them).
        fuse_projections(self.base)
        align_vision_mlp(self.base)
        fuse_elementwise(self.base, compiled=compile_step)  # the eager prefill's and tower's elementwise kernels
        self.fused_layers = fused_layer_count(self.base)  # fused here or before (int4 serving fuses first)
        self.max_cache_len = max_cache_len
        self.slots = slots
        self.compiled = compile_step
        self.buckets = bucket_sizes(slots, compile_step)
        gen = self.base.generation_config
        eos = gen.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.repetition_penalty = float(gen.repetition_penalty or 1.0)
        self.device = self.base.get_input_embeddings().weight.device
        text = self.base.config.text_config
        self.vocab = self.base.get_output_embeddings().weight.shape[0]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        # Per-slot state, on the device; rows 0..n-1 of these are a step's inputs.
        self.mask = torch.zeros(slots, max_cache_len, dtype=torch.bool, device=self.device)
        self.write_at = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.position = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.seen = torch.zeros(slots, self.vocab, dtype=torch.bool, device=self.device)
        self.last_token = torch.zeros(slots, dtype=torch.long, device=self.device)
        # Written with index_put_ from this device tensor, never a Python True: a CPU value is
        # copied to the GPU from pageable memory, which waits for the whole stream (the step in
        # flight) every time.
        self._true = torch.ones((), dtype=torch.bool, device=self.device)
        self._text_config = text
        self._step = (torch.compile(self._forward_step, mode="reduce-overhead", fullgraph=True)
                      if compile_step else self._forward_step)
        self.compile_s: dict[int, float] = {}
        # Prefill chunks: at most this many padded positions per forward pass (the engine's
        # decode.max_prefill_tokens, rounded up to CHUNK_WIDTH); their CUDA graphs, once captured.
        self.chunk_tokens = -(-chunk_tokens // CHUNK_WIDTH) * CHUNK_WIDTH
        self._chunk_graphs: dict[tuple[int, int], _ChunkGraph] = {}
        self.capture_s = 0.0

    # ---- bookkeeping
    @property
    def description(self) -> str:
        """How this decoder runs, in words (for records, logs and /health)."""
        fused = ", fused projections" if self.fused_layers else ""
        mode = "compiled step" if self.compiled else "eager step"
        return f"continuous batching over {self.slots} cache slots, {mode}{fused}"

    def bucket(self, rows: int) -> int:
        """The batch size actually run for ``rows`` running rows."""
        for size in self.buckets:
            if size >= rows:
                return size
        raise ValueError(f"{rows} rows exceed the {self.slots} cache slots")

    def fits(self, prompt_len: int, max_new_tokens: int) -> bool:
        return prompt_len + max_new_tokens <= self.max_cache_len

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        if not self.fits(prompt_len, max_new_tokens):
            raise PromptTooLong(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens exceed the context of "
                                f"{self.max_cache_len} tokens (decode.max_cache_len)")

    def _allocate(self, dtype: torch.dtype) -> None:
        """The cache itself: keys and values ``[slots, kv_heads, max_cache_len, head_dim]`` per
        layer, on that layer's device, in the prompts' dtype."""
        text = self._text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        for layer in self.base.model.language_model.layers:  # slot ``slots``: scratch for a chunk's padding
            shape = (self.slots + 1, text.num_key_value_heads, self.max_cache_len, head_dim)
            device = layer.input_layernorm.weight.device
            self.keys.append(torch.zeros(shape, dtype=dtype, device=device))
            self.values.append(torch.zeros(shape, dtype=dtype, device=device))
        if self.compiled:  # fixed addresses: the CUDA graphs read and write these in place
            for t in (*self.keys, *self.values, self.mask, self.write_at, self.position, self.seen):
                torch._dynamo.mark_static_address(t)

    def _penalize(self, logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        p = self.repetition_penalty
        if p == 1.0:
            return logits
        return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)

    # ---- prefill
    def _on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy to the model's device without waiting for the step in flight (a copy from pageable
        host memory would wait for the whole stream)."""
        if self.device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def prompt_row(self, tensors: dict[str, torch.Tensor]) -> PromptRow:
        """One unpadded prompt (the processor's tensors; ``image_embeds`` in place of
        ``pixel_values`` if the vision tower already ran) as a :class:`PromptRow`.

        Why the checks and positions run on the CPU copy: on a GPU each ``.item()`` or
        ``.tolist()`` waits for the decoding step in flight; ``get_rope_index`` has several per
        prompt. Nothing here waits for the GPU, so the engine's loop queues the prefill while the
        running rows' step computes.
        """
        cpu = {k: tensors[k].cpu() for k in ("input_ids", "attention_mask", "image_grid_thw", "mm_token_type_ids")
               if k in tensors}  # (already there when the engine calls: prompts are prepared on the CPU)
        ids = cpu["input_ids"]
        images = self._image_embeddings({**tensors, **cpu}, int((ids == self.base.config.image_token_id).sum()))
        positions = generation_position_ids(self.base, cpu)
        ids = self._on_device(ids[0])
        embeds = self.base.get_input_embeddings()(ids)
        if images is not None:
            mask = (ids == self.base.config.image_token_id)[:, None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, images.to(embeds.dtype))
        return PromptRow(embeds, self._on_device(positions[:, 0]), ids)

    def _image_embeddings(self, tensors: dict[str, torch.Tensor], image_tokens: int) -> torch.Tensor | None:
        """The prompt's image embeddings (the vision tower runs here on ``pixel_values``),
        checked against its ``image_tokens`` before any GPU work: a mismatch would read past the
        embeddings on the GPU."""
        grid = tensors.get("image_grid_thw")
        rows = 0 if grid is None else int(grid.prod(-1).sum()) // self.base.config.vision_config.spatial_merge_size ** 2
        if "image_embeds" in tensors:
            rows = tensors["image_embeds"].shape[0]
        if rows != image_tokens:
            raise ValueError(f"{image_tokens} image tokens in the prompt but {rows} image embeddings")
        if "image_embeds" in tensors:
            return self._on_device(tensors["image_embeds"])
        if "pixel_values" in tensors:
            features = self.base.model.get_image_features(self._on_device(tensors["pixel_values"]),
                                                          self._on_device(grid))
            return torch.cat(features.pooler_output, dim=0)
        return None

    @torch.inference_mode()
    def prefill(self, rows: list[PromptRow], first: int, start: int = 0, stops: list[int] | None = None) -> torch.Tensor:
        """Prefill prompt positions ``start..stops[i]`` of ``rows[i]`` into slot ``first + i``
        (``stops`` default: each row's whole prompt); returns each row's logits after its last
        position here, ``[rows, vocab]`` (float32, penalized; meaningful for rows that finished
        their prompt, whose slots are then ready to decode).

        All rows start at the same position: new prompts at 0, or one prompt going on from its
        last chunk (the engine prefills chunks of one long prompt over several turns, between
        decoding steps). Rows run in groups of a chunk bucket (:func:`chunk_groups`), each a
        CUDA graph replay once :meth:`capture_chunks` has run.
        """
        stops = stops or [row.length for row in rows]
        widths = [stop - start for stop in stops]
        if start + max(widths) > self.max_cache_len:
            self.check_fits(start + max(widths), 0)
        if not self.keys:
            self._allocate(rows[0].embeds.dtype)
        logits = [self._prefill_group(rows[a:b], first + a, start, stops[a:b])
                  for a, b in chunk_groups(widths, self.chunk_tokens)]
        return torch.cat(logits)

    def _prefill_group(self, rows: list[PromptRow], first: int, start: int, stops: list[int]) -> torch.Tensor:
        """One chunk forward pass: the rows padded to their bucket (padding writes in the
        scratch slot), run by its CUDA graph if captured, then each finished row's slot state."""
        n = len(rows)
        bucket_rows, width = chunk_shape(n, max(stop - start for stop in stops))
        token_slots = torch.full((bucket_rows, width), self.slots, dtype=torch.long)
        token_columns = torch.arange(width).clamp(max=self.max_cache_len - 1).repeat(bucket_rows, 1)
        row_slots = torch.full((bucket_rows,), self.slots, dtype=torch.long)
        last = torch.zeros(bucket_rows, dtype=torch.long)
        embeds = rows[0].embeds.new_zeros(bucket_rows, width, rows[0].embeds.shape[-1])
        positions = torch.zeros(4, bucket_rows, width, dtype=torch.long, device=self.device)
        for i, (row, stop) in enumerate(zip(rows, stops, strict=True)):
            w = stop - start
            token_slots[i, :w], row_slots[i], last[i] = first + i, first + i, w - 1
            token_columns[i, :w] = torch.arange(start, stop)
            embeds[i, :w] = row.embeds[start:stop]
            positions[:, i, :w] = row.positions[:, start:stop]
        forward = self._chunk_graphs.get((bucket_rows, width), self._chunk_forward)
        logits = forward(embeds=embeds, positions=positions, token_slots=self._on_device(token_slots),
                         token_columns=self._on_device(token_columns), row_slots=self._on_device(row_slots),
                         last=self._on_device(last))[:n]
        # fill_ and device tensors only: writing a Python number into a CUDA tensor element
        # (``t[i] = 3``) copies it from pageable memory, which waits for everything queued (the
        # chunk just launched): py-spy found the engine's thread there for 40% of a load test.
        for slot, row, stop in zip(range(first, first + n), rows, stops, strict=True):
            self.mask[slot].fill_(False)
            self.write_at[slot].fill_(stop)  # a step over a larger bucket writes here, where the next chunk writes again
            if stop == row.length:
                self.mask[slot, :stop].fill_(True)
                self.position[slot].copy_(row.positions[1:, -1].max() + 1)  # text after the prompt: all 3 rows equal
                self.seen[slot].fill_(False)
                self.seen[slot].index_put_((row.ids,), self._true)
        return self._penalize(logits, self.seen[first:first + n])

    def _chunk_forward(self, embeds: torch.Tensor, positions: torch.Tensor, token_slots: torch.Tensor,
                       token_columns: torch.Tensor, row_slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The language model over one padded chunk; returns the logits at each row's ``last``
        position, ``[rows, vocab]`` float32. Shapes depend on the bucket only."""
        columns = torch.arange(self.max_cache_len, device=embeds.device)
        mask = (columns[None, None, :] <= token_columns[:, :, None])[:, None]  # [rows, 1, width, cache]
        out = self.base.model(inputs_embeds=embeds, attention_mask={"full_attention": mask}, position_ids=positions,
                              past_key_values=_ChunkCacheView(self.keys, self.values, token_slots, token_columns,
                                                              row_slots), use_cache=True)
        hidden = out.last_hidden_state[torch.arange(embeds.shape[0], device=embeds.device), last]
        return self.base.lm_head(hidden).float()

    @torch.inference_mode()
    def capture_chunks(self) -> float:
        """Capture every chunk bucket up to ``chunk_tokens`` positions as a CUDA graph (a GPU
        only; at start-up, after the cache exists); returns the seconds it took."""
        started = time.perf_counter()
        if self.device.type != "cuda" or not self.keys:
            return 0.0
        pool = torch.cuda.graph_pool_handle()
        for rows in CHUNK_ROWS:
            for width in range(CHUNK_WIDTH, self.chunk_tokens + 1, CHUNK_WIDTH):
                if rows * width <= self.chunk_tokens and rows <= self.slots and width <= self.max_cache_len:
                    self._chunk_graphs[rows, width] = _ChunkGraph(self, rows, width, pool)
        _sync(self.device)
        log.info("%d prefill chunk shapes captured as CUDA graphs in %.1f s", len(self._chunk_graphs),
                 time.perf_counter() - started)
        return time.perf_counter() - started

    def prefill_batch(self, inputs: dict[str, torch.Tensor], first: int) -> torch.Tensor:
        """:meth:`prefill` of a left-padded processor batch (benchmarks, tests, warm-up): each row
        into its own slot, from ``first``; returns each row's first-token logits."""
        merge = self.base.config.vision_config.spatial_merge_size
        rows = [self.prompt_row(row) for row in split_rows(inputs, self.base.config.image_token_id, merge)]
        return self.prefill(rows, first)

    # ---- decoding steps
    def _forward_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """The compiled function: one new token for each of the first ``len(tokens)`` slots."""
        rows = tokens.shape[0]
        positions = self.position[:rows].view(1, rows, 1).expand(3, rows, 1)
        mask = {"full_attention": self.mask[:rows, None, None, :]}
        out = self.model(input_ids=tokens.view(rows, 1), attention_mask=mask, position_ids=positions,
                         past_key_values=_SlotCacheView(self.keys, self.values, self.write_at[:rows]), use_cache=True)
        return self._penalize(out.logits[:, -1, :].float(), self.seen[:rows])

    @torch.inference_mode()
    def step(self, rows: int) -> torch.Tensor:
        """Feed each of slots ``0..rows-1`` its last token; returns their next-token logits
        ``[rows, vocab]`` (float32, penalized; valid until the next step)."""
        bucket = self.bucket(rows)
        live = torch.arange(rows, device=self.device)
        self.mask.index_put_((live, self.write_at[:rows]), self._true)  # the new token attends to itself
        tokens = self.last_token[:bucket]
        if self.compiled:
            if bucket > 1:
                torch._dynamo.mark_dynamic(tokens, 0)  # one compiled graph for every bucket (a CUDA graph each)
            torch.compiler.cudagraph_mark_step_begin()
        with _attention(self._text_config, DECODE_ATTENTION):
            logits = self._step(tokens)
        self.write_at[:rows] += 1
        self.position[:rows] += 1
        return logits[:rows]

    @torch.inference_mode()
    def accept(self, first: int, tokens: torch.Tensor) -> None:
        """Record the chosen tokens of slots ``first``, ``first+1``, ...: the next step's inputs,
        and seen for the repetition penalty."""
        rows = torch.arange(first, first + tokens.shape[0], device=self.device)
        self.last_token[rows] = tokens
        self.seen.index_put_((rows, tokens), self._true)

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Copy slot ``source`` into slot ``target`` (keeps running rows packed at the front)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target].copy_(keys[source])
            values[target].copy_(values[source])
        for state in (self.mask, self.write_at, self.position, self.seen, self.last_token):
            state[target].copy_(state[source])

    def free(self, slot: int) -> None:
        """Forget slot ``slot`` (its row ended and no running row was moved into it): a step over
        a larger bucket still computes this slot, and must write inside it (at column 0), never at
        the column past the end that an exactly-fitting row's look-ahead step leaves behind."""
        for state in (self.mask, self.write_at, self.position):
            state[slot].fill_(0)  # fill_, never ``state[slot] = 0``: that waits for the GPU (see _prefill_group)

    def reset(self) -> None:
        """Forget every row (warm-up leaves its traces in the per-slot state)."""
        for state in (self.mask, self.write_at, self.position, self.seen, self.last_token):
            state.zero_()

    # ---- a fixed batch, start to end (benchmarks, tests)
    @torch.inference_mode()
    def generate(self, inputs: Any, max_new_tokens: int, stop_at_eos: bool = True,
                 keep_logits: bool = False) -> Decoded:
        """Greedy-decode one left-padded batch in slots ``0..batch-1`` (nothing else may run).

        ``stop_at_eos=False`` decodes exactly ``max_new_tokens`` (benchmarks with random weights).
        """
        batch, prompt_len = inputs["input_ids"].shape
        self.check_fits(prompt_len, max_new_tokens)
        _sync(self.device)
        started = time.perf_counter()
        logits = self.prefill_batch(inputs, 0)
        token = logits.argmax(dim=-1)
        self.accept(0, token)
        _sync(self.device)
        ttft = time.perf_counter() - started
        kept = [logits.clone()] if keep_logits else None
        tokens = [token]
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        finished = torch.isin(token, eos) if stop_at_eos else torch.zeros_like(token, dtype=torch.bool)
        for step in range(1, max_new_tokens):
            if stop_at_eos and step % 8 == 0 and bool(finished.all()):
                break
            logits = self.step(batch)
            token = logits.argmax(dim=-1)
            if kept is not None:
                kept.append(logits.clone())
            self.accept(0, token)
            tokens.append(token)
            if stop_at_eos:
                finished |= torch.isin(token, eos)
        generated = torch.stack(tokens, dim=1).cpu()
        latency = time.perf_counter() - started
        return Decoded(sequences=[self._trim(generated[i].tolist(), stop_at_eos) for i in range(batch)],
                       ttft_s=ttft, latency_s=latency, step_logits=kept)

    def _trim(self, ids: list[int], stop_at_eos: bool) -> list[int]:
        """Cut after the first end-of-sequence token (what follows is not part of the answer)."""
        if stop_at_eos:
            for i, token in enumerate(ids):
                if token in self.eos_ids:
                    return ids[: i + 1]
        return ids

    def warm_up(self, row: PromptRow, steps: int = 3) -> dict[int, float]:
        """Prefill ``row`` (:meth:`prompt_row`), compile (and capture) the step for every bucket,
        then capture the prefill chunks (:meth:`capture_chunks`); returns seconds per decoding
        bucket.

        Run once at start-up: the first call compiles the step (batch dimension dynamic), each
        bucket's first calls record its CUDA graph; after this no request pays for compilation.
        """
        self.prefill([row], 0)
        for rows in self.buckets if self.compiled else (1,):
            started = time.perf_counter()
            for _ in range(steps):
                self.step(rows)
            _sync(self.device)
            self.compile_s[rows] = time.perf_counter() - started
            log.info("decode step for batch %d ready in %.1f s (%s)", rows, self.compile_s[rows],
                     "compiled" if self.compiled else "eager")
        if self.compiled:
            self.capture_s = self.capture_chunks()
        self.reset()
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
