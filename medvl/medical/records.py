"""The extraction record: its one definition, its JSON schema, and turning an answer into it.

:class:`ExtractionRecord` is the single definition of the record: the training answers are
written from it (:func:`record_answer`), the API's /extract response embeds it, and
:data:`RECORD_SCHEMA` (derived from it) is the grammar /extract, the CLI and phase 7 decode
under (:mod:`medvl.engine.grammar`), so the three cannot drift apart.

/extract, the CLI and phase 7 all go through :func:`structured_result`, so a record has one
shape and one parsing path; a document of several pages (a PDF) is read page by page and its
pages' records merged by :func:`document_result`, which says where each item came from. Answers decoded under the schema parse as JSON ("json"); the
repair pass and the lexicon fallback are for free-text answers only (a model asked without
the grammar, e.g. through the chat route) and are labelled "repaired" and "fallback".
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from medvl.medical import lexicon


class _Closed(BaseModel):
    """No key beyond the declared ones (``additionalProperties: false`` in the schema: the
    grammar then allows exactly the record's keys)."""

    model_config = ConfigDict(extra="forbid")


class Medication(_Closed):
    name: str = ""
    dose: str = ""
    route: str = ""
    frequency: str = ""


class LabValue(_Closed):
    name: str = ""
    value: str = ""
    unit: str = ""
    flag: str = ""
    reference_range: str = ""


class ExtractionRecord(_Closed):
    """What a reader should extract from a medical document (keys in answer order).

    Every key is required (a list may be empty): with optional keys ``{}`` was a valid record,
    and the tiny base model answered it (2 tokens) on every page. Required keys make the
    grammar walk the whole record, so "nothing here" is said per key, not by omission."""

    medications: list[Medication]
    diagnoses: list[str]
    procedures: list[str]
    lab_values: list[LabValue]
    vitals: dict[str, str]


# The grammar of every extraction answer (extra="forbid": no key the record does not name).
RECORD_SCHEMA: dict[str, Any] = ExtractionRecord.model_json_schema()


def is_valid_record(text: str) -> bool:
    """Whether ``text`` is JSON valid against :data:`RECORD_SCHEMA` (as the grammar promises)."""
    try:
        ExtractionRecord.model_validate_json(text, strict=True)
    except ValueError:
        return False
    return True


def empty_structured() -> dict[str, Any]:
    """The record with every key present and nothing in it (the empty-record baseline)."""
    return ExtractionRecord(medications=[], diagnoses=[], procedures=[], lab_values=[], vitals={}).model_dump()


def record_answer(record: dict[str, Any]) -> str:
    """The training answer for ``record``: validated against the record, written as
    ``json.dumps`` writes it (the spacing the grammar allows, :data:`medvl.engine.grammar.JSON_SEPARATORS`)."""
    return json.dumps(ExtractionRecord.model_validate(record).model_dump(), ensure_ascii=False)


def _json_candidate(text: str) -> str | None:
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("{")
    if start < 0:
        return None
    return text[start:]


def repair_json(text: str) -> Any:
    """Best-effort repair of a model's almost-JSON: fences, trailing commas, unclosed brackets;
    an answer cut inside a key or value loses its last, unfinished item (cut back to an earlier
    comma, at most 50 tries), so a cut answer keeps what it completed."""
    candidate = _json_candidate(text)
    if candidate is None:
        raise ValueError("no JSON object in the answer")
    candidate = re.sub(r",\s*([}\]])", r"\1", candidate)
    try:
        return json.loads(_closed(candidate))
    except json.JSONDecodeError as exc:
        error = exc
    commas = [i for i, ch in enumerate(candidate) if ch == ","]
    for cut in reversed(commas[-50:]):
        try:
            return json.loads(_closed(candidate[:cut]))
        except json.JSONDecodeError:
            continue
    raise error


def _closed(candidate: str) -> str:
    """``candidate`` up to its first complete top-level value, or with its open string and
    brackets closed."""
    stack: list[str] = []
    in_string = escaped = False
    end = len(candidate)
    for i, ch in enumerate(candidate):
        if in_string:
            escaped = (ch == "\\") and not escaped
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                end = i
                break
            stack.pop()
            if not stack:
                end = i + 1
                break
    body = candidate[:end] + ('"' if in_string else "")
    body = re.sub(r",\s*$", "", body) + "".join(reversed(stack))
    return re.sub(r",\s*([}\]])", r"\1", body)


def normalize_structured(data: Any) -> dict[str, Any]:
    """Coerce a parsed answer into the record's shape (keys the record does not name dropped)."""
    out = empty_structured()
    if not isinstance(data, dict):
        raise ValueError("the JSON answer is not an object")
    for key, item_model in (("medications", Medication), ("lab_values", LabValue)):
        items = data.get(key) or []
        out[key] = [{k: str(v) for k, v in item.items() if k in item_model.model_fields}
                    for item in items if isinstance(item, dict)] if isinstance(items, list) else []
    for key in ("diagnoses", "procedures"):
        items = data.get(key) or []
        out[key] = [str(i) for i in items if isinstance(i, (str, int, float))] if isinstance(items, list) else []
    vitals = data.get("vitals") or {}
    out["vitals"] = {str(k): str(v) for k, v in vitals.items()} if isinstance(vitals, dict) else {}
    return out


def lexicon_fallback(text: str) -> dict[str, Any]:
    """The documented last resort: drugs (with a following dose) and conditions found in plain text."""
    out = empty_structured()
    for name, *_ in lexicon.DRUGS:
        match = re.search(rf"\b{re.escape(name)}\b\s*(\d+(?:\.\d+)?\s?(?:mg|mcg|g|units))?", text, re.I)
        if match:
            out["medications"].append({"name": name, "dose": match.group(1) or "", "route": "", "frequency": ""})
    for full, abbr in lexicon.CONDITIONS:
        for word in (full, abbr):
            if word and re.search(rf"\b{re.escape(word)}\b", text):
                out["diagnoses"].append(word)
                break
    return out


def parse_structured(text: str) -> tuple[dict[str, Any], str]:
    """Answer text -> (structured record, how it was obtained: json | repaired | fallback)."""
    candidate = _json_candidate(text)
    if candidate is not None:
        try:
            return normalize_structured(json.loads(candidate[: candidate.rfind("}") + 1])), "json"
        except (ValueError, json.JSONDecodeError):
            pass
        try:
            return normalize_structured(repair_json(text)), "repaired"
        except (ValueError, json.JSONDecodeError):
            pass
    return lexicon_fallback(text), "fallback"


def structured_result(text: str) -> dict[str, Any]:
    """What /extract and the CLI return for one answer: record, how it was parsed, flags."""
    from medvl.medical import flags

    structured, status = parse_structured(text)
    return {"structured": structured, "parse_status": status, "flags": flags.check(structured),
            "disclaimer": flags.DISCLAIMER}


# --------------------------------------------------------------------------- documents of several pages

# A document's parse status is its worst page's: a repaired or fallback page taints the record.
_PARSE_STATUS_ORDER = ("json", "ocr", "repaired", "fallback")
_LIST_KEYS = ("medications", "diagnoses", "procedures", "lab_values")


def json_pointer(*parts: str | int) -> str:
    """An RFC 6901 pointer into the record, e.g. ``/lab_values/0`` or ``/vitals/blood_pressure``."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def resolve_pointer(record: dict[str, Any], pointer: str) -> Any:
    """The value at an RFC 6901 ``pointer`` of ``record`` (the inverse of :func:`json_pointer`)."""
    value: Any = record
    for part in pointer.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def merge_pages(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, str]]]:
    """Page records, in page order -> (the document's record, each item's pointer and page, conflicts).

    Lists are concatenated in page order. An item repeated exactly on a later page (a diagnosis
    in every page's header, a medication list carried over) is kept once, at its first page;
    items that differ in any field are all kept (serial lab values are distinct readings). A
    vital sign read on two pages with different values keeps the first page's value in the
    record and yields a ``vital_differs_between_pages`` flag naming both, so no reading is lost
    silently. Worked example::

        page 1: {"diagnoses": ["HTN"], "vitals": {"heart_rate": "88 bpm"}, ...}
        page 2: {"diagnoses": ["HTN", "CKD 3b"], "lab_values": [{"name": "Creatinine", ...}],
                 "vitals": {"heart_rate": "96 bpm"}, ...}
        record: {"diagnoses": ["HTN", "CKD 3b"], "lab_values": [{"name": "Creatinine", ...}],
                 "vitals": {"heart_rate": "88 bpm"}, ...}
        items:  /diagnoses/0 page 1, /vitals/heart_rate page 1, /diagnoses/1 page 2,
                /lab_values/0 page 2
        conflicts: heart_rate 96 bpm on page 2 against 88 bpm on page 1
    """
    merged = empty_structured()
    items: list[dict[str, Any]] = []
    conflicts: list[dict[str, str]] = []
    vital_pages: dict[str, int] = {}
    for page, record in enumerate(records, start=1):
        for key in _LIST_KEYS:
            for item in record.get(key, []):
                if item not in merged[key]:
                    items.append({"pointer": json_pointer(key, len(merged[key])), "page": page})
                    merged[key].append(item)
        for name, value in record.get("vitals", {}).items():
            kept = merged["vitals"].get(name)
            if kept is None:
                merged["vitals"][name] = value
                vital_pages[name] = page
                items.append({"pointer": json_pointer("vitals", name), "page": page})
            elif kept != value:
                conflicts.append({"rule": "vital_differs_between_pages", "item": name, "value": value,
                                  "reason": f"page {page} reads {value}; the record keeps page "
                                            f"{vital_pages[name]}'s {kept}", "severity": "warning"})
    return merged, items, conflicts


def document_result(pages: list[dict[str, Any]]) -> dict[str, Any]:
    """One result for a document from its pages' results (each as :func:`structured_result` or
    the OCR baseline gives it, in page order): the merged record, where each item came from, its
    worst page's parse status, and the flags of the whole record (an interaction between drugs
    on different pages is caught) with any vital that differs between pages."""
    from medvl.medical import flags

    structured, items, conflicts = merge_pages([page["structured"] for page in pages])
    status = max((page["parse_status"] for page in pages), key=_PARSE_STATUS_ORDER.index)
    return {"structured": structured, "items": items, "parse_status": status,
            "flags": flags.check(structured) + conflicts, "disclaimer": flags.DISCLAIMER}
