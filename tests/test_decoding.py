"""The slot decoder computes, for each row, what plain greedy generate computes for that
prompt alone (tiny model, CPU).

The decoder fuses its model's projections in place, so every comparison runs ``generate`` on
a separately loaded, unfused model: the tests cover the fusion and the grouped attention too.
"""

import pytest
import torch
from PIL import Image
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from medvl.engine.slot_cache import (
    PromptTooLong,
    SlotDecoder,
    bucket_sizes,
    fuse_projections,
    grouped_decode_attention,
)
from medvl.medical.documents import benchmark_documents, render_document
from medvl.medical.prompts import BENCHMARK_PROMPTS
from medvl.model.compare import build_inputs
from medvl.model.loading import load_model, load_processor

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir, tiny_settings):
    """The unfused model: plain ``generate`` runs on it, never a decoder."""
    return load_model(tiny_model_dir, tiny_settings), load_processor(tiny_model_dir, tiny_settings)


@pytest.fixture(scope="module")
def decoding_model(tiny_model_dir, tiny_settings):
    """A second copy of the same weights, for the decoders (which fuse it)."""
    return load_model(tiny_model_dir, tiny_settings)


@pytest.fixture(scope="module")
def pages():
    docs = benchmark_documents(1234, 3)
    return [render_document(d) for d in docs], [BENCHMARK_PROMPTS[d.kind] for d in docs]


def alone(processor, images, prompts):
    """Each (image, prompt) as its own unpadded batch of one."""
    return [build_inputs(processor, [i], [p], torch.device("cpu")) for i, p in zip(images, prompts, strict=True)]


def plain_answers(model, inputs, max_new_tokens):
    """New tokens per row from generate, cut after the first end-of-sequence token."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = set(model.generation_config.eos_token_id)
    answers = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:cut])
    return answers


def test_grouped_decode_attention_matches_sdpa():
    """One query position, 8 query heads over 2 KV heads, a boolean mask hiding some cache
    slots (as a static cache's unfilled tail): the same output as transformers' SDPA path."""
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 8, 1, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False
    mask[1, ..., :2] = False
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    got, _ = grouped_decode_attention(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(got, expected)


def test_fused_projections_compute_the_same_logits(tiny_model_dir, tiny_settings, model_and_processor, pages):
    model, processor = model_and_processor
    images, prompts = pages
    inputs = build_inputs(processor, images[:2], prompts[:2], torch.device("cpu"))
    fused = load_model(tiny_model_dir, tiny_settings)
    assert fuse_projections(fused) == model.config.text_config.num_hidden_layers
    assert fuse_projections(fused) == 0  # already fused
    layer = fused.model.language_model.layers[0]
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "gate_proj")
    with torch.inference_mode():
        torch.testing.assert_close(fused(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_each_row_of_a_left_padded_batch_gets_its_tokens_alone(model_and_processor, decoding_model, pages):
    """Three prompts of different lengths prefilled together (left padding) and decoded in one
    batch: each row's tokens are what generate gives that prompt alone."""
    model, processor = model_and_processor
    images, prompts = pages
    prompts = [prompts[0], "Read this page.", prompts[2] + " Be brief."]  # different lengths: left padding
    inputs = build_inputs(processor, images, prompts, torch.device("cpu"))
    assert (inputs["attention_mask"] == 0).any()
    decoder = SlotDecoder(decoding_model, max_cache_len=2048, slots=4, compile_step=False)
    assert decoder.fused_layers == model.config.text_config.num_hidden_layers
    expected = [plain_answers(model, one, NEW_TOKENS)[0] for one in alone(processor, images, prompts)]
    assert decoder.generate(inputs, NEW_TOKENS).sequences == expected


def test_end_of_sequence_stops_a_row_and_the_others_go_on(model_and_processor, decoding_model, pages):
    """Make a token the first row emits early an end-of-sequence token: that row stops there,
    the others run on, exactly as generate does."""
    model, processor = model_and_processor
    images, prompts = pages
    inputs = build_inputs(processor, images[:2], prompts[:2], torch.device("cpu"))
    first = SlotDecoder(decoding_model, 2048, 2, False).generate(inputs, NEW_TOKENS).sequences
    stop = first[0][3]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = decoding_model.generation_config.eos_token_id = [*saved, stop]
    try:
        decoded = SlotDecoder(decoding_model, 2048, 2, False).generate(inputs, NEW_TOKENS).sequences
        expected = [plain_answers(model, one, NEW_TOKENS)[0] for one in alone(processor, images[:2], prompts[:2])]
    finally:
        model.generation_config.eos_token_id = decoding_model.generation_config.eos_token_id = saved
    assert decoded == expected
    assert decoded[0][-1] == stop and len(decoded[0]) <= 4


def test_compiled_step_gives_the_same_tokens(model_and_processor, decoding_model, pages):
    """The real thing: the torch.compile'd decoding step (inductor on the CPU), one graph with a
    dynamic batch dimension for the buckets 2 and 4; one row runs in bucket 2, three in 4."""
    model, processor = model_and_processor
    images, prompts = pages
    assert bucket_sizes(4, compiled=True) == (2, 4) and bucket_sizes(4, compiled=False) == (1, 2, 4)
    decoder = SlotDecoder(decoding_model, max_cache_len=1024, slots=4, compile_step=True)
    one = build_inputs(processor, images[:1], prompts[:1], torch.device("cpu"))
    compile_s = decoder.warm_up(decoder.prompt_row(one))
    assert set(compile_s) == {2, 4}
    assert decoder.generate(one, NEW_TOKENS).sequences == plain_answers(model, one, NEW_TOKENS)
    three = build_inputs(processor, images, prompts, torch.device("cpu"))
    expected = [plain_answers(model, x, NEW_TOKENS)[0] for x in alone(processor, images, prompts)]
    assert decoder.generate(three, NEW_TOKENS).sequences == expected


def test_a_prompt_longer_than_the_cache_is_refused(model_and_processor, decoding_model):
    model, processor = model_and_processor
    inputs = build_inputs(processor, [Image.new("RGB", (224, 224), "white")], ["Read."], torch.device("cpu"))
    with pytest.raises(PromptTooLong, match="decode.max_cache_len"):
        SlotDecoder(decoding_model, max_cache_len=64, slots=1, compile_step=False).generate(inputs, 8)


def test_prefill_chunks_group_into_buckets_that_hold_the_token_budget():
    """Rows run in (rows, width) buckets, width a multiple of 128 and rows a power of two up to 8:
    three 736-token pages under a 2048 budget are two forward passes (2 x 768, then 1 x 640), not
    one padded 4 x 768; a row wider than the budget still runs, alone."""
    from medvl.engine.slot_cache import chunk_groups, chunk_shape

    assert chunk_shape(3, 736) == (4, 768) and chunk_shape(1, 1) == (1, 128) and chunk_shape(9, 10) == (9, 128)
    assert chunk_groups([736, 736, 576], 2048) == [(0, 2), (2, 3)]
    assert chunk_groups([40] * 10, 2048) == [(0, 8), (8, 10)]  # 8 x 128 fits; a 9th row would pad to 16
    assert chunk_groups([3000, 10], 2048) == [(0, 1), (1, 2)]
    assert chunk_groups([100], 128) == [(0, 1)]
