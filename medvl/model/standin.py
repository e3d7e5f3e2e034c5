"""Build an architecture-faithful Qwen2.5-VL stand-in offline.

No machine here reaches the model hub, yet every phase needs a model that loads and runs
exactly like ``Qwen/Qwen2.5-VL-7B-Instruct``. This writes a folder with the same files as
the hub snapshot (config.json, generation_config.json, tokenizer files, chat template,
Qwen2-VL image processor config, safetensors weights) so that ``AutoProcessor`` and
``AutoModelForImageTextToText`` load it unchanged:

- ``tiny``: the same module graph with tiny dimensions, for the CPU and CI;
- ``7b``: the real 7B dimensions (8.3 B parameters, vocab 152064) with random weights, for
  measuring memory and speed at full scale without a download.

The tokenizer is chosen by ``model.standin_tokenizer``: ``qwen2.5`` is Qwen2.5's real
151,643-rank byte-level BPE with Qwen2.5-VL's added tokens at their real ids, rebuilt offline
(``medvl.model.tokenizer``), so 7B-scale figures count real tokens; ``trained`` is a
small byte-level BPE trained here on synthetic medical text with Qwen's pre-tokenizer and
special tokens (151k embedding rows would swamp the tiny model). The config's special-token
ids are always read from the tokenizer; no dimension changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from medvl.medical.documents import tokenizer_corpus
from medvl.model.tokenizer import ADDED_TOKENS, N_SPECIAL, build_qwen25_tokenizer

log = logging.getLogger(__name__)

# Qwen2.5's special tokens, in the hub tokenizer's order.
SPECIAL_TOKENS = ADDED_TOKENS[:N_SPECIAL]
TOKENIZERS = ("trained", "qwen2.5")

# Qwen2.5-VL-7B-Instruct's chat template (chat_template.json on the hub).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The hub config of Qwen2.5-VL-7B-Instruct, dimension for dimension.
TEXT_7B: dict[str, Any] = {
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "sliding_window": 32768,
    "max_window_layers": 28, "use_sliding_window": False, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
VISION_7B: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
    "hidden_act": "silu", "in_channels": 3,
}
# Same graph, tiny widths. head_dim 32 -> mrope sections must sum to 16.
# A random narrow model's logits are capped near |W_out| * sqrt(hidden): at the hub's init
# std of 0.02 every distribution stays almost uniform and LoRA (which cannot touch lm_head
# or the final norm) cannot lower the loss. A wider init gives the tiny model the logit
# range a trained model has, so a CPU fine-tune can show real learning.
TEXT_TINY: dict[str, Any] = {
    "initializer_range": 0.2,
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "sliding_window": 32768,
    "max_window_layers": 2, "use_sliding_window": False, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
}
VISION_TINY: dict[str, Any] = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
    "out_hidden_size": 128, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2,
    "hidden_act": "silu", "in_channels": 3,
}
# A model that learns the task on one GPU in minutes (the `small` profile): 512 wide, 8 layers,
# 24 M weights in its decoder blocks beside Qwen2.5's 151,680-row embedding and head (78 M each),
# a 4-block vision tower. Head dim 64 -> mrope sections sum to 32 (the 7B's 16:24:24 halved
# and rounded). Widths are multiples of 128, so AWQ's groups of 128 and the int4 kernel fit.
TEXT_SMALL: dict[str, Any] = {
    "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "sliding_window": 32768,
    "max_window_layers": 8, "use_sliding_window": False, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
}
VISION_SMALL: dict[str, Any] = {
    "depth": 4, "hidden_size": 256, "intermediate_size": 768, "num_heads": 4,
    "out_hidden_size": 512, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "window_size": 112, "fullatt_block_indexes": [3], "tokens_per_second": 2,
    "hidden_act": "silu", "in_channels": 3,
}
ARCHITECTURES = {"tiny": (TEXT_TINY, VISION_TINY), "small": (TEXT_SMALL, VISION_SMALL),
                 "7b": (TEXT_7B, VISION_7B)}
# Saved in bf16 as the hub's weights are; tiny in float32 (CPU arithmetic, tests).
SAVED_DTYPE = {"tiny": torch.float32, "small": torch.bfloat16, "7b": torch.bfloat16}


def train_tokenizer(vocab_size: int, corpus: Iterable[str] | None = None) -> Tokenizer:
    """Byte-level BPE over ``corpus`` (default: synthetic medical text), split the way Qwen2 splits."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus() if corpus is None else corpus, trainer=trainer)
    return tokenizer


def qwen_tokenizer(bpe: Tokenizer) -> Any:
    """A Qwen2Tokenizer around a trained BPE, with Qwen's special tokens and end token."""
    from transformers import Qwen2Tokenizer

    state = json.loads(bpe.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["model"]["vocab"], merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.padding_side = "left"  # batched generation pads on the left
    return tokenizer


def build_tokenizer(kind: str, vocab_size: int) -> Any:
    """Qwen2.5's real tokenizer (``qwen2.5``) or one trained on synthetic text (``trained``)."""
    if kind == "qwen2.5":
        log.info("building Qwen2.5's tokenizer from its rank file (151,643 ranks)")
        return build_qwen25_tokenizer()
    if kind == "trained":
        log.info("training a %d-token byte-level BPE tokenizer on synthetic medical text", vocab_size)
        return qwen_tokenizer(train_tokenizer(vocab_size))
    raise ValueError(f"unknown stand-in tokenizer {kind!r}; one of {', '.join(TOKENIZERS)}")


def build_processor(tokenizer_kind: str, vocab_size: int, min_pixels: int, max_pixels: int):
    """A Qwen2_5_VLProcessor with the hub's chat template around the chosen tokenizer."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(tokenizer_kind, vocab_size)
    image_processor = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor()
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_config(architecture: str, tokenizer) -> Any:
    """Qwen2_5_VLConfig with the architecture's dimensions and the tokenizer's special ids."""
    from transformers import Qwen2_5_VLConfig

    text, vision = ARCHITECTURES[architecture]
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    text = dict(text)
    # The 7B keeps its 152064-row embedding (the hub's too is larger than its tokenizer);
    # the tiny one is sized to its tokenizer, rounded up to a multiple of 64 as Qwen does.
    text.setdefault("vocab_size", -(-len(tokenizer) // 64) * 64)
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=dict(vision),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, architectures=["Qwen2_5_VLForConditionalGeneration"],
    )


def build_generation_config(tokenizer) -> Any:
    from transformers import GenerationConfig

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # Greedy by default: benchmarks and evaluation must be reproducible.
    return GenerationConfig(bos_token_id=pad, eos_token_id=[end, pad], pad_token_id=pad,
                            do_sample=False, repetition_penalty=1.05)


def meta_model(architecture: str, vocab_size: int = 4096):
    """The model built on the meta device (no memory), for parameter counts."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision = ARCHITECTURES[architecture]
    text = {"vocab_size": vocab_size, **text}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision))
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def build_standin(out_dir: Path, architecture: str, tokenizer_kind: str, vocab_size: int,
                  min_pixels: int, max_pixels: int, seed: int) -> dict[str, Any]:
    """Write the stand-in snapshot to ``out_dir``; returns what was built.

    Weights are drawn on the GPU when one is present (an 8 B model initialised on a CPU
    takes minutes), saved in :data:`SAVED_DTYPE` (bf16 but for tiny's float32).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown stand-in architecture {architecture!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor(tokenizer_kind, vocab_size, min_pixels, max_pixels)
    config = build_config(architecture, processor.tokenizer)
    dtype = SAVED_DTYPE[architecture]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("initialising %s weights (seed %d) on %s in %s", architecture, seed, device, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config = build_generation_config(processor.tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out_dir, max_shard_size="4GB", safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "STANDIN.md").write_text(
        f"# Stand-in for Qwen/Qwen2.5-VL-7B-Instruct ({architecture})\n\n"
        "Built offline by medvl.model.standin: the Qwen2.5-VL architecture with random weights and "
        + ("Qwen2.5's own tokenizer (rebuilt from its rank file)"
           if tokenizer_kind == "qwen2.5" else "a tokenizer trained on synthetic medical text")
        + ".\nIts outputs are not meaningful text; use it for plumbing, memory and speed, never\n"
        "for quality claims.\n"
    )
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"architecture": architecture, "parameters": n_params, "dtype": str(dtype),
            "tokenizer": tokenizer_kind, "tokenizer_size": len(processor.tokenizer),
            "init_device": device}
