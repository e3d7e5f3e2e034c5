"""Grammar-constrained decoding: answers that are valid JSON (against a schema) by construction.

Why: /extract used to parse the model's text after the fact, with a repair pass and a lexicon
fallback; on the tiny pipeline every fine-tuned answer on the test split ended as "fallback"
(35 of 35), and real Qwen2.5-VL models also break JSON on long pages (repetition loops,
unclosed arrays). Here, as in vLLM and SGLang, a grammar engine turns the JSON schema into a
token mask for each step: the tokens that cannot continue a valid answer get ``-inf`` before
the greedy choice or sampling, so every answer the model finishes is valid JSON.

The engine is xgrammar, chosen by measurement (``scripts/perf_grammar.py``, this project's
tokenizer and the record schema, 3,335 steps over 20 training answers on the CPU): a mask in
5.2 µs on average (p50 2.7 µs) against 21.5 µs (p50 17.2 µs) for llguidance, both accepting
every training answer token for token; it is also vLLM's and SGLang's default. Each running
row keeps its own matcher; rows with and without a grammar share a batch (the mask is applied
to the grammar rows only).

Running out of tokens: a row whose budget (``max_tokens``) is about to end inside the JSON
would give a cut, unparsable answer. When ``CLOSE_RESERVE`` tokens or fewer are left, the row
is steered to close: among the tokens the grammar allows, a closing quote first when inside a
string, else tokens made only of ``]`` and ``}``, else of those, ``"``, ``:`` and space (an
empty key or value), else of those and ``,`` (on to a required key), else whatever the
grammar allows (a number's digits, a key's letters); in each case the longest such token. The answer is then complete, valid JSON with its
last item shortened, and the result says so (``closed_early``); phase 7 counts these. A schema
that cannot be closed in the reserve (required content still missing) ends at ``max_tokens``
with ``finish_reason`` "length", as OpenAI's API does.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

# How json.dumps writes (and so how the training answers are written): the grammar allows
# exactly this spacing, no free whitespace (a random or confused model would fill a row with
# spaces and newlines otherwise).
JSON_SEPARATORS = (", ", ": ")
# Tokens left when a grammar row starts closing its JSON. The record's deepest point (inside a
# key of a lab value) closes in under 20 tokens even when every token is one character.
CLOSE_RESERVE = 24
LONGEST_STEERED = 32  # token lengths (bytes) told apart when steering; longer ones count as this


class GrammarError(ValueError):
    """A response format or JSON schema the grammar engine cannot compile."""


@dataclass(frozen=True)
class ResponseFormat:
    """What an answer must be: any JSON object, or JSON valid against ``schema`` (JSON text).

    Frozen and hashable (the schema is kept as text), so it travels inside
    :class:`medvl.engine.SamplingParams`.
    """

    kind: Literal["json_object", "json_schema"]
    schema: str = ""

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> ResponseFormat:
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        return cls("json_schema", json.dumps(schema, sort_keys=False))


def _clean(error: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", text)


class RowGrammar:
    """One request's grammar state: its matcher, and whether the answer is inside a string."""

    def __init__(self, matcher: Any, token_bytes: list[bytes]) -> None:
        self.matcher = matcher
        self._token_bytes = token_bytes
        self.in_string = False
        self._escaped = False
        self.closed_early = False  # steered to close because the budget ran low

    def accept(self, token: int) -> bool:
        """Advance past ``token`` (the one chosen under this row's mask); False if refused."""
        if self.matcher.is_terminated():
            return True  # after the end token nothing more counts (a wasted look-ahead token)
        if not self.matcher.accept_token(token):
            return False
        for byte in self._token_bytes[token] if token < len(self._token_bytes) else b"":
            if self.in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self.in_string = False
            elif byte == 0x22:
                self.in_string = True
        return True

    @property
    def finished(self) -> bool:
        return bool(self.matcher.is_terminated())


class Grammars:
    """Compiles response formats for one tokenizer and applies the rows' masks to logits.

    Built with the engine (before traffic): the tokenizer's table costs ~5 ms for this
    project's 4 k-token stand-in, longer for a 152 k vocabulary. Compiled grammars are cached
    by the compiler, so the record schema compiles once.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: list[int], device: torch.device,
                 slots: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                            stop_token_ids=list(stop_ids))
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self.vocab_size = vocab_size
        self.device = device
        self._token_bytes = list(self.info.decoded_vocab)
        self.bitmask = xgrammar.allocate_token_bitmask(slots, vocab_size)
        if device.type == "cuda":
            self.bitmask = self.bitmask.pin_memory()
        self._closers = self._closing_tiers()

    # ---- compiling
    def compile(self, fmt: ResponseFormat) -> Any:
        """The compiled grammar of ``fmt``, or :class:`GrammarError` naming the problem."""
        try:
            if fmt.kind == "json_object":  # any object: keys the schema does not name are allowed
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         separators=JSON_SEPARATORS, strict_mode=False)
            return self.compiler.compile_json_schema(fmt.schema, any_whitespace=False, separators=JSON_SEPARATORS)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be used: {_clean(exc)}") from None

    def row(self, fmt: ResponseFormat) -> RowGrammar:
        """A fresh matcher for one request."""
        return RowGrammar(self._xgr.GrammarMatcher(self.compile(fmt)), self._token_bytes)

    # ---- masking
    def _pack(self, bits: torch.Tensor) -> torch.Tensor:
        """A bool per token id -> xgrammar's bitmask words (signed int32, bit ``i % 32`` of word ``i // 32``)."""
        words = (bits.view(-1, 32).to(torch.int64) << torch.arange(32)).sum(dim=1)
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    def _closing_tiers(self) -> dict[str, torch.Tensor]:
        """Bitmasks of the tokens that close JSON, by preference (see the module docstring), and
        of the tokens of each length (``_by_length[k]``: ``k + 1`` bytes; the last row: longer)."""
        special = set(self.info.special_token_ids)
        width = self.bitmask.shape[1] * 32
        lengths = torch.zeros(width, dtype=torch.long)
        for token, text in enumerate(self._token_bytes):
            lengths[token] = 0 if token in special else min(len(text), LONGEST_STEERED)
        self._by_length = torch.stack([self._pack(lengths == k) for k in range(1, LONGEST_STEERED + 1)])

        def mask_of(test: Any) -> torch.Tensor:
            bits = torch.zeros(width, dtype=torch.bool)
            for token, text in enumerate(self._token_bytes):
                if text and token not in special and test(text):
                    bits[token] = True
            return self._pack(bits)

        return {
            "quote": mask_of(lambda t: t[:1] == b'"' and set(t[1:]) <= set(b"]}")),
            "brackets": mask_of(lambda t: set(t) <= set(b"]}")),
            "empty": mask_of(lambda t: set(t) <= set(b'"]}: ')),
            "onward": mask_of(lambda t: set(t) <= set(b'"]}:, ')),
        }

    def _longest(self, words: torch.Tensor) -> torch.Tensor:
        """The longest of the tokens in ``words`` (fewest steps to the end): one AND against the
        masks of each length (~50 µs for a 152 k vocabulary), not a pass over the vocabulary."""
        by_length = self._by_length & words
        longest = int(by_length.any(dim=1).nonzero().max())
        return by_length[longest]

    def _steer_to_close(self, index: int, row: RowGrammar) -> None:
        """Narrow row ``index``'s mask to its most closing tokens the grammar allows, the longest
        of them; when none closes (a key's letters, a number's digits, an enum's value), the
        longest allowed token."""
        allowed = self.bitmask[index]
        row.closed_early = True
        for tier in (("quote",) if row.in_string else ("brackets", "empty", "onward")):
            narrowed = allowed & self._closers[tier]
            if bool(narrowed.any()):
                allowed.copy_(self._longest(narrowed))
                return
        allowed.copy_(self._longest(allowed.clone()))

    def apply(self, logits: torch.Tensor, rows: list[tuple[int, RowGrammar, int]]) -> None:
        """Mask ``logits`` (``[batch, vocab]``) in place for ``rows``: (row index, grammar,
        tokens left in its budget). Rows not listed are left as they are."""
        if not rows:
            return
        for index, row, left in rows:
            row.matcher.fill_next_token_bitmask(self.bitmask, index)
            if left <= CLOSE_RESERVE:
                self._steer_to_close(index, row)
        # From pinned memory, without waiting; the buffer is refilled only after this step's
        # tokens were read back, which is later on the same stream.
        mask = self.bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size,
                                              indices=[index for index, _, _ in rows])

    def warm_up(self) -> None:
        """Compile the masking kernel (Triton on a GPU) before traffic."""
        logits = torch.zeros(1, self.vocab_size, device=self.device)
        self._xgr.apply_token_bitmask_inplace(logits, self.bitmask[:1].to(self.device), vocab_size=self.vocab_size)
