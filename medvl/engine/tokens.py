"""Tokens as bytes: what a client of log-probabilities, and the per-field confidences, need.

Qwen's tokenizer is byte-level BPE: each token stands for bytes, written with GPT-2's table of
printable characters; a token may hold part of a multi-byte character, so a token's text alone
can be invalid UTF-8, while the tokens' bytes always join into the answer's bytes.
"""

from __future__ import annotations

import functools
from typing import Any

from medvl.engine.scheduler import Result, TokenLogprob
from medvl.medical.confidence import field_confidences
from medvl.medical.records import structured_result


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable characters back to the bytes they stand for (GPT-2's table,
    which Qwen's tokenizer uses: printable bytes stand for themselves, the other 68 for the
    characters from U+0100 on, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """A token's own bytes (a piece of a multi-byte character is its bytes alone)."""
    piece = tokenizer.convert_ids_to_tokens(token_id) or ""
    table = _byte_decoder()
    return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)


def answer_tokens(tokenizer: Any, logprobs: list[TokenLogprob]) -> list[tuple[bytes, float]]:
    """An answer's tokens as (bytes, log-probability), special tokens (the end of the answer)
    left out, as the answer's text leaves them out."""
    special = set(tokenizer.all_special_ids)
    return [(token_bytes(tokenizer, e.token), e.logprob) for e in logprobs if e.token not in special]


def record_page(result: Result, tokenizer: Any) -> dict[str, Any]:
    """A page's answer under the record's schema as its record result
    (medvl.medical.records.structured_result), with each field's confidence
    (medvl.medical.confidence) when the answer parsed as the record's JSON and its tokens'
    log-probabilities were asked for (``SamplingParams.logprobs=0``). /extract and the CLI share it."""
    page = structured_result(result.text)
    if page["parse_status"] == "json" and result.logprobs is not None:
        page["confidence"] = field_confidences(result.text, answer_tokens(tokenizer, result.logprobs))
    return page
