"""A confidence for every field the model wrote: the probability it gave that field's exact value.

A record answer is JSON decoded token by token under the record's grammar; each token comes
with its log-probability (medvl.engine.scheduler.token_logprobs: after the repetition penalty
and the grammar's mask, before temperature). A field's confidence is the joint probability of
the tokens that wrote its value, ``exp(sum of their log-probabilities)``: the model's
probability of that exact value, given the page and what it wrote before. Why the joint and
not the least likely token or the mean: a dose like "500 mg" is four decisions ("5", "0", "0",
" mg"); two that are each 70% sure make the value 49% sure, and only the product says so (the
minimum says 70%, a mean more). Long values are not penalised for their length: the tokens
after the first few of a drug name are near 1.

Worked example (log-probabilities rounded)::

    answer   {"medications": [{"name": "Metformin", "dose": "500 mg", ...
    tokens   ... "Met" (-0.02) "formin" (-0.00) ... "5" (-0.36) "0" (-0.36) "0" (-0.01) " mg" (-0.00)
    fields   /medications/0/name 0.98, /medications/0/dose 0.49

A token that straddles a value's edge (``0"`` in some tokenizers) counts for the value. An empty
value ("" for a field the page does not give) has no tokens of its own and no confidence.
"""

from __future__ import annotations

import json
import math
import re

from medvl.medical.records import json_pointer

_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")


class _Scanner:
    """Where each scalar value of a JSON text is, as (pointer, start, end) character spans; a
    string's span is inside its quotes."""

    def __init__(self, text: str) -> None:
        self.text, self.spans = text, []

    def skip(self, i: int) -> int:
        while i < len(self.text) and self.text[i] in " \t\r\n":
            i += 1
        return i

    def value(self, i: int, pointer: str) -> int:
        i = self.skip(i)
        first = self.text[i]
        if first == "{":
            return self.container(i + 1, "}", lambda j, n: self.member(j, pointer))
        if first == "[":
            return self.container(i + 1, "]", lambda j, n: self.value(j, pointer + json_pointer(n)))
        if first == '"':
            end = self.string_end(i)
            self.spans.append((pointer, i + 1, end))
            return end + 1
        match = _SCALAR.match(self.text, i)
        if match is None:
            raise ValueError(f"no JSON value at {i}")
        self.spans.append((pointer, i, match.end()))
        return match.end()

    def container(self, i: int, close: str, item: object) -> int:
        i, n = self.skip(i), 0
        if self.text[i] == close:
            return i + 1
        while True:
            i = self.skip(item(i, n))
            n += 1
            if self.text[i] == ",":
                i += 1
            elif self.text[i] == close:
                return i + 1
            else:
                raise ValueError(f"expected ',' or {close!r} at {i}")

    def member(self, i: int, pointer: str) -> int:
        i = self.skip(i)
        end = self.string_end(i)
        key = json.loads(self.text[i:end + 1])
        i = self.skip(end + 1)
        if self.text[i] != ":":
            raise ValueError(f"expected ':' at {i}")
        return self.value(i + 1, pointer + json_pointer(key))

    def string_end(self, i: int) -> int:
        """The index of the quote closing the string that opens at ``i``."""
        if self.text[i] != '"':
            raise ValueError(f"expected a string at {i}")
        j = i + 1
        while self.text[j] != '"':
            j += 2 if self.text[j] == "\\" else 1
        return j


def value_spans(text: str) -> list[tuple[str, int, int]]:
    """Each scalar of the JSON object in ``text`` (from its first ``{``) as (pointer, start, end)
    character spans, in order; [] when it is not a whole JSON object."""
    start = text.find("{")
    if start < 0:
        return []
    scanner = _Scanner(text)
    try:
        scanner.value(start, "")
    except (IndexError, ValueError):
        return []
    return scanner.spans


def field_confidences(text: str, tokens: list[tuple[bytes, float]]) -> dict[str, float]:
    """Each non-empty field of the JSON answer ``text`` -> its confidence (module docstring).

    ``tokens``: the answer's tokens as (their bytes, their log-probability), in order, without
    special tokens; their bytes must make ``text`` (else {}: the confidences would be misplaced).
    """
    encoded = text.encode()
    if b"".join(raw for raw, _ in tokens) != encoded:
        return {}
    starts, offset = [], 0
    for raw, _ in tokens:
        starts.append(offset)
        offset += len(raw)
    confidences = {}
    for pointer, start, end in value_spans(text):
        if end <= start:
            continue
        first, last = len(text[:start].encode()), len(text[:end].encode())
        total = sum(logprob for (raw, logprob), at in zip(tokens, starts, strict=True)
                    if at < last and at + len(raw) > first)
        confidences[pointer] = math.exp(total)
    return confidences


def document_confidences(document: dict, pages: list[dict], below: float) -> dict:
    """``document`` (medvl.medical.records.document_result of ``pages``) with each item's
    confidences, from the page it came from (``confidence`` in each page's result: its fields'
    confidences by pointer into that page's record), and ``needs_review`` (items under ``below``
    or without a confidence). An item kept from its first page is scored on that page. In place;
    returns ``document``."""
    merged, owners = document["structured"], {item["pointer"]: item["page"] for item in document["items"]}
    confidences: dict[str, float] = {}
    for number, page in enumerate(pages, start=1):
        moved = {}
        for key, values in page["structured"].items():
            if isinstance(values, list):
                for j, value in enumerate(values):
                    target = json_pointer(key, merged[key].index(value))
                    if owners.get(target) == number:
                        moved[json_pointer(key, j)] = target
            else:
                moved.update({json_pointer(key, name): json_pointer(key, name) for name in values
                              if owners.get(json_pointer(key, name)) == number})
        for pointer, value in page.get("confidence", {}).items():
            prefix = next((p for p in moved if pointer == p or pointer.startswith(p + "/")), None)
            if prefix is not None:
                confidences[moved[prefix] + pointer[len(prefix):]] = value
    item_confidences(document["items"], confidences)
    document["needs_review"] = needs_review(document["items"], below)
    return document


def item_confidences(items: list[dict], confidences: dict[str, float]) -> None:
    """Give each item (``{"pointer", "page"}``, medvl.medical.records.merge_pages) its fields'
    confidences (``fields``, for an item with fields) and its own: its least sure field's
    (``confidence``; None when none of its fields has one). In place."""
    for item in items:
        pointer = item["pointer"]
        own = {p: c for p, c in confidences.items() if p == pointer or p.startswith(pointer + "/")}
        if any(p != pointer for p in own):
            item["fields"] = {p[len(pointer) + 1:]: c for p, c in own.items() if p != pointer}
        item["confidence"] = min(own.values()) if own else None


def needs_review(items: list[dict], below: float) -> list[str]:
    """Pointers of the items to check by hand, least sure first: a confidence under ``below``, or
    none at all (no field read from the model's JSON)."""
    unsure = [item for item in items if item.get("confidence") is None or item["confidence"] < below]
    return [item["pointer"] for item in sorted(unsure, key=lambda item: item.get("confidence") or 0.0)]


CALIBRATION_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def calibration(items: list[tuple[float, bool]], threshold: float) -> dict:
    """How well confidences predict correctness, from (item confidence, the scorer's verdict):
    accuracy per confidence bin (a reliability diagram's points: calibrated where accuracy ~
    mean confidence), the expected calibration error (the bins' |accuracy - confidence| weighted
    by their items), and the accuracy of items at or above ``threshold`` (kept) and below it
    (sent to review)."""
    def share(chosen: list[tuple[float, bool]]) -> dict:
        return {"items": len(chosen), "accuracy": sum(ok for _, ok in chosen) / len(chosen) if chosen else None}

    bins = []
    for low, high in zip(CALIBRATION_BINS, CALIBRATION_BINS[1:], strict=False):
        inside = [(c, ok) for c, ok in items if low <= c < high or (high == 1.0 and c == 1.0)]
        bins.append({"range": [low, high], **share(inside),
                     "mean_confidence": sum(c for c, _ in inside) / len(inside) if inside else None})
    error = sum(b["items"] * abs(b["accuracy"] - b["mean_confidence"]) for b in bins if b["items"]) / max(len(items), 1)
    return {"items": len(items), "bins": bins, "expected_calibration_error": error if items else None,
            "threshold": threshold, "above": share([i for i in items if i[0] >= threshold]),
            "below": share([i for i in items if i[0] < threshold])}
