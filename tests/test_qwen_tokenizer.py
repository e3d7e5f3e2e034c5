"""The 7b-random stand-in's tokenizer is Qwen2.5's own, rebuilt offline from its rank file."""

import pytest
import tiktoken
from transformers import AutoProcessor

from medvl.medical.documents import tokenizer_corpus
from medvl.model.standin import CHAT_TEMPLATE, build_processor
from medvl.model.tokenizer import (
    ADDED_TOKENS,
    N_RANKS,
    RankFileMissing,
    load_ranks,
    rank_file,
    replay_bpe,
)

# Qwen's pre-tokenizer pattern, as tiktoken's reference encoding takes it.
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

MIXED_TEXT = [
    'def f(x):\n    """Docstring."""\n    return {"a": [1, 2.50, -3e-4]}\n\n\n',
    "Metformin 500 mg PO BID;  HbA1c 7.2 %  (H)\tref 4.0-5.6\r\nK+ 5.9 mmol/L",
    "naïve café — 東京 1234567 ünïcödé emojis 🩺💊 and    many     spaces   ",
    "I'm sure they'll say it's the patient's chart; WE'RE DONE.",
]


@pytest.fixture(scope="module")
def processor():
    return build_processor("qwen2.5", 4096, 3136, 200704)


@pytest.fixture(scope="module")
def reference():
    """tiktoken's own BPE over the same ranks: the encoding Qwen's ids were defined by."""
    special = {token: N_RANKS + i for i, token in enumerate(ADDED_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=QWEN_PATTERN, mergeable_ranks=load_ranks(),
                             special_tokens=special)


def test_published_qwen2_sequences(processor):
    tok = processor.tokenizer
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok(" the")["input_ids"] == [279]
    assert tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")["input_ids"] == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645]
    ids = [tok.convert_tokens_to_ids(t) for t in
           ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")]
    assert ids == [151644, 151645, 151652, 151655, 151653]
    assert len(tok) == 151665
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_ids_equal_tiktoken_and_decode_round_trips(processor, reference):
    tok = processor.tokenizer
    texts = tokenizer_corpus() + MIXED_TEXT + ['"""', '"""\n', "  \n\n\t"]
    n = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == reference.encode_ordinary(text), text[:80]
        assert tok.decode(ids) == text
        n += len(ids)
    assert n > 100_000  # the comparison covered a real amount of text


def test_merges_come_from_replaying_bpe_not_from_the_lowest_ranked_split():
    ranks = load_ranks()
    triple = b'"""'
    # tiktoken encodes '"""' as one token; its merge is what BPE below its rank leaves.
    assert triple in ranks
    pieces = replay_bpe(ranks, triple, ranks[triple])
    assert len(pieces) == 2 and b"".join(pieces) == triple


def test_chat_template_of_a_page_and_question_matches_qwen25_vl(processor, reference):
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "Describe this image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # transformers' Qwen2-VL/Qwen2.5-VL documentation, "Expected output" of apply_chat_template
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert processor.tokenizer(text)["input_ids"] == reference.encode(text, allowed_special="all")
    assert processor.chat_template == CHAT_TEMPLATE


def test_saved_tokenizer_loads_with_auto_processor_like_the_hubs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"
    for text in MIXED_TEXT:
        assert loaded.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert loaded.tokenizer.convert_tokens_to_ids("<tool_call>") == 151657


def test_a_rank_file_that_is_not_qwens_is_refused(tmp_path):
    changed = tmp_path / "qwen.tiktoken"
    changed.write_bytes(rank_file().read_bytes().replace(b"IQ== 0", b"IQ== 9", 1))
    with pytest.raises(RankFileMissing, match="sha256"):
        load_ranks(changed)
