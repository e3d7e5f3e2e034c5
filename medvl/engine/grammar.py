"""Grammar-constrained decoding: answers that are valid JSON (against a schema) by construction.

Why: /extract used to parse the model's text after the fact, with a repair pass and a lexicon
fallback; on the tiny pipeline every fine-tuned answer on the test split ended as "fallback"
(35 of 35), and real Qwen2.5-VL models also break JSON on long pages (repetition loops,
unclosed arrays). Here, as in vLLM and SGLang, a grammar engine turns the JSON schema into a
token mask for each step: the tokens that cannot continue a valid answer get ``-inf`` before
the greedy choice or sampling, so every answer the model finishes is valid JSON.

The engine is llguidance, chosen by measurement (``bench/perf_grammar.py``: the record
schema, 32 training answers replayed token by token, both libraries accepting every token).
On a 151,643-token byte-level BPE (Qwen's size) one mask took 26 µs on average with llguidance
against 129 µs with xgrammar on an H100 host (32 against 105 µs on a 2-core CPU); on a
1,778-token tokenizer xgrammar was faster (3.7 against 11.8 µs), but the real model's
vocabulary is the one that counts (docs/results/h100/README.md). With Qwen2.5's own tokenizer
(the 7b-random stand-in's) one llguidance mask took 33 µs and 32 rows' masks 1.6 ms per step
on an H200 host (docs/results/h200/README.md). Each
running row keeps its own matcher; a step's rows are filled together on llguidance's thread
pool; rows with and without a grammar share a batch (only the grammar rows are masked).

Running out of tokens: a row whose budget (``max_tokens``) is about to end inside the JSON
would give a cut, unparsable answer. When ``CLOSE_RESERVE`` tokens or fewer are left, the row
is steered to close: among the tokens the grammar allows, a closing quote first when inside a
string, else tokens made only of ``]`` and ``}``, else of those, ``"``, ``:`` and space (an
empty key or value), else of those and ``,`` (on to a required key), else a whole empty value
(``{}``, ``[]``), else whatever the grammar allows (a number's digits, a key's letters); in
each case the longest such token.
The answer is then complete, valid JSON with its last item shortened, and the result says so
(``closed_early``); phase 7 counts these. A schema that cannot be closed in the reserve
(required content still missing) ends at ``max_tokens`` with ``finish_reason`` "length", as
OpenAI's API does.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from medvl.medical.records import RECORD_SCHEMA

log = logging.getLogger(__name__)

# How json.dumps writes (and so how the training answers are written): the grammar allows
# exactly this spacing, no free whitespace (a random or confused model would fill a row with
# spaces and newlines otherwise).
JSON_SEPARATORS = (", ", ": ")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0],
                "key_separator": JSON_SEPARATORS[1]}
# Tokens left when a grammar row starts closing its JSON. Every key of the record is required,
# so closing from its deepest point (inside the first medication) writes every empty list that
# follows: 36 tokens at most with the tiny stand-in's tokenizer, 37 with Qwen2.5's (every cut
# of 10 answers replayed, steered to close), where optional keys needed under 20.
CLOSE_RESERVE = 48
COMPILED_KEPT = 64  # distinct response formats kept compiled (a user schema compiles in ~1-4 ms)


class GrammarError(ValueError):
    """A response format or JSON schema the grammar engine cannot compile."""


@dataclass(frozen=True)
class ResponseFormat:
    """What an answer must be: any JSON object, or JSON valid against ``schema`` (JSON text).

    Frozen and hashable (the schema is kept as text), so it travels inside
    :class:`medvl.engine.scheduler.SamplingParams` and keys the cache of compiled grammars.
    """

    kind: Literal["json_object", "json_schema"]
    schema: str = '{"type": "object"}'

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> ResponseFormat:
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be an object")
        return cls("json_schema", json.dumps(schema))


# Every extraction answer (/extract, medvl-infer, phases 7 and 8) decodes under the record's
# schema, compiled once at warm-up (medvl.engine.loader).
RECORD_FORMAT = ResponseFormat.json_schema(RECORD_SCHEMA)


class RowGrammar:
    """One request's grammar state: its matcher, and whether the answer is inside a string."""

    def __init__(self, matcher: Any, token_bytes: list[bytes], stop_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self._token_bytes = token_bytes
        self._stop_ids = stop_ids
        self.in_string = False
        self._escaped = False
        self.finished = False  # its end token was chosen: nothing after it is part of the answer
        self.closed_early = False  # steered to close because the budget ran low

    def accept(self, token: int) -> bool:
        """Advance past ``token`` (the one chosen under this row's mask); False if refused."""
        if self.finished:
            return True  # a look-ahead token after the end (the engine drops it)
        if not self.matcher.consume_token(token):
            return False
        self.finished = token in self._stop_ids
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


def _whole_empty_value(text: bytes) -> bool:
    """``{}``, ``[]``, ``""``, ``[]}`` and the like: brackets and quotes that open and close."""
    return (set(text) <= set(b'{}[]"') and text.count(b"{") <= text.count(b"}")
            and text.count(b"[") <= text.count(b"]") and text.count(b'"') % 2 == 0)


class Grammars:
    """Compiles response formats for one tokenizer and applies the rows' masks to logits.

    Built with the engine (before traffic). Compiled grammars are kept per response format
    (each request gets a copy of the compiled matcher), so the record schema compiles once.

    The masks cover the tokenizer's own tokens; the logits' extra columns (the embedding's
    padding rows: 152,064 columns for Qwen's 151,665 tokens) are set to -inf for grammar rows apart, never walked by the grammar
    engine: with the padding inside xgrammar's tables, a mask took 143 µs on average instead
    of a few µs on an H100 host, and 32 grammar rows slowed decoding from 1,638 to 1,024
    tokens/s (docs/results/h100/, first run).
    """

    def __init__(self, tokenizer: Any, logits_width: int, stop_ids: list[int], device: torch.device,
                 slots: int) -> None:
        import llguidance
        import llguidance.hf

        self._llg = llguidance
        self.vocab_size = min(len(tokenizer), logits_width)  # token ids the tokenizer has
        self.logits_width = logits_width
        self.stop_ids = frozenset(stop_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=list(stop_ids))
        self.executor = llguidance.LLExecutor()
        self.device = device
        self._token_bytes = [self.tokenizer.decode_bytes([t]) for t in range(self.vocab_size)]
        words = (self.vocab_size + 31) // 32
        self.bitmask = torch.full((slots, words), -1, dtype=torch.int32)
        self._rows = torch.zeros(slots, dtype=torch.long)  # the masked rows' indices, copied with the masks
        if device.type == "cuda":  # pinned: copies that do not wait for the step in flight
            self.bitmask, self._rows = self.bitmask.pin_memory(), self._rows.pin_memory()
        self._words = self.bitmask.numpy().view(np.uint32)  # the same memory, for bit tests
        self._copied: torch.cuda.Event | None = None  # marks the end of the last copy out of those buffers
        self._shifts = torch.arange(32, dtype=torch.int32, device=device)
        self._compiled: collections.OrderedDict[ResponseFormat, Any] = collections.OrderedDict()
        self._lock = threading.Lock()  # compile is called from request threads
        self._closers = self._closing_tiers()

    # ---- compiling
    def compile(self, fmt: ResponseFormat) -> Any:
        """The compiled matcher of ``fmt`` (copy it per request), or :class:`GrammarError`."""
        with self._lock:
            if fmt in self._compiled:
                self._compiled.move_to_end(fmt)
                return self._compiled[fmt]
        try:
            grammar = self._llg.LLMatcher.grammar_from_json_schema(fmt.schema, defaults=JSON_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise GrammarError(f"the JSON schema cannot be used: {exc}") from None
        matcher = self._llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the JSON schema cannot be used: {' '.join(matcher.get_error().split())}")
        with self._lock:
            self._compiled[fmt] = matcher
            while len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        return matcher

    def row(self, fmt: ResponseFormat) -> RowGrammar:
        """A fresh matcher for one request."""
        return RowGrammar(self.compile(fmt).deep_copy(), self._token_bytes, self.stop_ids)

    # ---- steering a row to close its JSON
    def _closing_tiers(self) -> dict[str, list[int]]:
        """The tokens that close JSON, by preference (see the module docstring), longest first;
        and every token by length (for the last resort)."""
        lengths = np.array([0 if self.tokenizer.is_special_token(t) else len(b) for t, b in enumerate(self._token_bytes)])
        self._by_length = np.argsort(-lengths, kind="stable")  # token ids, longest first
        self._by_length = self._by_length[lengths[self._by_length] > 0]

        def tokens(test: Any) -> list[int]:
            return [int(t) for t in self._by_length if test(self._token_bytes[t])]

        return {
            "quote": tokens(lambda t: t[:1] == b'"' and set(t[1:]) <= set(b"]}")),
            "brackets": tokens(lambda t: set(t) <= set(b"]}")),
            "empty": tokens(lambda t: set(t) <= set(b'"]}: ')),
            "onward": tokens(lambda t: set(t) <= set(b'"]}:, ')),
            "whole": tokens(_whole_empty_value),
        }

    def _allowed(self, index: int, token: int) -> bool:
        return bool((self._words[index, token >> 5] >> np.uint32(token & 31)) & 1)

    def _steer_to_close(self, index: int, row: RowGrammar) -> None:
        """Narrow row ``index``'s mask to the one token that best closes its JSON."""
        row.closed_early = True
        for tier in (("quote",) if row.in_string else ("brackets", "empty", "onward", "whole")):
            choice = next((t for t in self._closers[tier] if self._allowed(index, t)), None)
            if choice is not None:
                break
        else:  # nothing closes here: the longest token the grammar allows
            allowed = np.unpackbits(self._words[index].view(np.uint8), bitorder="little")[self._by_length]
            if not allowed.any():
                return
            choice = int(self._by_length[int(np.argmax(allowed))])
        self.bitmask[index].zero_()
        self._words[index, choice >> 5] = np.uint32(1) << np.uint32(choice & 31)

    # ---- masking
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: list[tuple[int, RowGrammar, int]]) -> None:
        """Mask ``logits`` (``[batch, vocab]``) in place for ``rows``: (row index, grammar,
        tokens left in its budget). Rows not listed are left as they are."""
        if not rows:
            return
        from llguidance.torch import fill_next_token_bitmask_par

        if self._copied is not None:  # the buffers may still be read by the last copy (a prefill
            self._copied.synchronize()  # can come right after a step): wait for it, not the stream
        fill_next_token_bitmask_par(self.executor, [(row.matcher, index) for index, row, _ in rows], self.bitmask)
        for index, row, left in rows:
            if left <= CLOSE_RESERVE:
                self._steer_to_close(index, row)
        # From pinned memory, without waiting for the stream (the step in flight).
        count = len(rows)
        self._rows[:count] = torch.tensor([index for index, _, _ in rows])
        indices = self._rows[:count].to(logits.device, non_blocking=True)
        words = self.bitmask[: logits.shape[0]].to(logits.device, non_blocking=True)
        if logits.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        words = words.index_select(0, indices)
        allowed = ((words.unsqueeze(-1) >> self._shifts) & 1).view(count, -1)[:, : self.vocab_size].bool()
        blocked = torch.ones(count, self.logits_width, dtype=torch.bool, device=logits.device)
        blocked[:, : self.vocab_size] = ~allowed  # ids past the tokenizer: never valid
        logits.index_copy_(0, indices, logits.index_select(0, indices).masked_fill_(blocked, float("-inf")))
