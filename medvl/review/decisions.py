"""A reviewer's decisions on a filed record, checked and applied.

A decision names an item or one field of an item by its RFC 6901 pointer into the record, as
/extract's ``items`` and ``needs_review`` name them, and says what the reviewer found:

- ``accept``: right as read (an item, or one field);
- ``correct``: the right value, which replaces it (an item: a string for a diagnosis,
  procedure or vital, an object with the item's fields for a medication or lab value; a field:
  a string);
- ``reject``: not on the page: the item leaves the record (a field becomes "");
- ``add``: an item the model missed, appended to a list (``/medications``) or a new vital
  (``/vitals/heart_rate``), with the page it is on.

Worked example, a page read as ``{"medications": [{"name": "Metformin", "dose": "50 mg", ...},
{"name": "Aspirin", ...}], "diagnoses": ["HTN"], ...}``::

    /medications/0/dose  correct "500 mg"   -> Metformin's dose becomes "500 mg"
    /medications/1       reject             -> Aspirin leaves the record
    /diagnoses/0         accept             -> HTN stays
    /diagnoses           add "CKD 3b" p. 1  -> diagnoses ["HTN", "CKD 3b"]

The record a reviewer corrected is :func:`corrected`; the document is "corrected" when any
decision is not an acceptance, "accepted" otherwise (:func:`outcome`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from medvl.medical.records import ExtractionRecord, LabValue, Medication, json_pointer

ACTIONS = ("accept", "correct", "reject", "add")
ITEM_MODELS = {"medications": Medication, "lab_values": LabValue}
STRING_LISTS = ("diagnoses", "procedures")


@dataclass(frozen=True)
class Decision:
    pointer: str
    action: str
    value: Any = None
    page: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """As ``PUT /review/{id}`` takes it (no value or page where there is none)."""
        out: dict[str, Any] = {"pointer": self.pointer, "action": self.action}
        if self.value is not None:
            out["value"] = self.value
        if self.page is not None:
            out["page"] = self.page
        return out


class BadDecisions(ValueError):
    """Decisions that do not fit the record; the message lists every problem at once."""


def parts(pointer: str) -> list[str]:
    """An RFC 6901 pointer's reference tokens (``/vitals/a~1b`` -> ``["vitals", "a/b"]``)."""
    if not pointer.startswith("/"):
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]


def _target(record: dict[str, Any], pointer: str) -> tuple[str, str | int, str | None] | None:
    """(key, item, field) that ``pointer`` names in ``record``, or None where it names nothing."""
    p = parts(pointer)
    if len(p) < 2 or p[0] not in record:
        return None
    key = p[0]
    if key == "vitals":
        return (key, p[1], None) if len(p) == 2 and p[1] in record[key] else None
    if not p[1].isdigit() or int(p[1]) >= len(record[key]):
        return None
    if len(p) == 2:
        return key, int(p[1]), None
    if len(p) == 3 and key in ITEM_MODELS and p[2] in ITEM_MODELS[key].model_fields:
        return key, int(p[1]), p[2]
    return None


def _value_problem(key: str, field: str | None, value: Any) -> str | None:
    """Why ``value`` cannot stand for an item (or field) of ``key``, or None."""
    if field is not None or key in STRING_LISTS or key == "vitals":
        return None if isinstance(value, str) and value.strip() else "needs a non-empty string"
    try:
        ITEM_MODELS[key].model_validate(value, strict=True)
    except ValueError:
        return f"needs an object with only these string fields: {', '.join(ITEM_MODELS[key].model_fields)}"
    return None


def check(decisions: list[Decision], record: dict[str, Any], page_count: int) -> None:
    """Raise :class:`BadDecisions` naming every decision that does not fit ``record``."""
    problems = []
    seen: set[str] = set()
    removed_items: set[tuple[str, str | int]] = set()
    fielded_items: set[tuple[str, str | int]] = set()
    for n, d in enumerate(decisions):
        where = f"decision {n} ({d.pointer} {d.action})"
        if d.action not in ACTIONS:
            problems.append(f"{where}: the action is one of {', '.join(ACTIONS)}")
            continue
        if d.action == "add":
            p = parts(d.pointer)
            new_vital = len(p) == 2 and p[0] == "vitals" and p[1] and p[1] not in record["vitals"]
            if not (new_vital or (len(p) == 1 and p[0] in (*ITEM_MODELS, *STRING_LISTS))):
                problems.append(f"{where}: add to a list (/medications, /diagnoses, /procedures, /lab_values) "
                                "or a vital the record lacks (/vitals/<name>)")
                continue
            if (why := _value_problem(p[0], None, d.value)) is not None:
                problems.append(f"{where}: {why}")
            if d.page is None or not 1 <= d.page <= page_count:
                problems.append(f"{where}: give the page it is on, 1 to {page_count}")
            if new_vital and d.pointer in seen:
                problems.append(f"{where}: added twice")
            seen.add(d.pointer)
            continue
        target = _target(record, d.pointer)
        if target is None:
            problems.append(f"{where}: names no item or field of the record")
            continue
        if d.pointer in seen:
            problems.append(f"{where}: decided twice")
        seen.add(d.pointer)
        key, item, field = target
        if field is not None:
            fielded_items.add((key, item))
        elif d.action == "reject":
            removed_items.add((key, item))
        if d.action == "correct" and (why := _value_problem(key, field, d.value)) is not None:
            problems.append(f"{where}: {why}")
        if d.action in ("accept", "reject") and d.value is not None:
            problems.append(f"{where}: an {d.action} carries no value")
    for key, item in sorted(removed_items & fielded_items, key=str):
        problems.append(f"{json_pointer(key, item)} is rejected and has decisions on its fields too")
    if problems:
        raise BadDecisions("; ".join(problems))


def corrected(record: dict[str, Any], items: list[dict[str, Any]], decisions: list[Decision]
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record with ``decisions`` applied (checked first with :func:`check`) and each of its
    items' pointer and page (``items`` as /extract gives them; an added item's page is its own)."""
    pages = {item["pointer"]: item["page"] for item in items}
    by_pointer = {d.pointer: d for d in decisions if d.action != "add"}
    out: dict[str, Any] = {key: [] for key in record if key != "vitals"}
    out["vitals"] = {}
    out_items: list[dict[str, Any]] = []
    for key, values in record.items():
        if key == "vitals":
            continue
        for i, value in enumerate(values):
            pointer = json_pointer(key, i)
            decision = by_pointer.get(pointer)
            if decision is not None and decision.action == "reject":
                continue
            value = copy.deepcopy(decision.value if decision is not None and decision.action == "correct" else value)
            for field in ITEM_MODELS[key].model_fields if key in ITEM_MODELS else ():
                fd = by_pointer.get(f"{pointer}/{field}")
                if fd is not None and fd.action in ("correct", "reject"):
                    value[field] = fd.value if fd.action == "correct" else ""
            out_items.append({"pointer": json_pointer(key, len(out[key])), "page": pages.get(pointer, 1)})
            out[key].append(value)
    for name, value in record["vitals"].items():
        pointer = json_pointer("vitals", name)
        decision = by_pointer.get(pointer)
        if decision is not None and decision.action == "reject":
            continue
        out["vitals"][name] = decision.value if decision is not None and decision.action == "correct" else value
        out_items.append({"pointer": pointer, "page": pages.get(pointer, 1)})
    for d in decisions:
        if d.action != "add":
            continue
        key, *rest = parts(d.pointer)
        if key == "vitals":
            out["vitals"][rest[0]] = d.value
            out_items.append({"pointer": d.pointer, "page": d.page})
        else:
            out_items.append({"pointer": json_pointer(key, len(out[key])), "page": d.page})
            out[key].append(copy.deepcopy(d.value))
    return ExtractionRecord.model_validate(out).model_dump(), out_items


def page_records(record: dict[str, Any], items: list[dict[str, Any]], page_count: int) -> list[dict[str, Any]]:
    """The record split by the page each item is on: one record per page, in page order (what
    phase 5 trains each page to answer)."""
    pages = [ExtractionRecord(medications=[], diagnoses=[], procedures=[], lab_values=[], vitals={}).model_dump()
             for _ in range(page_count)]
    for item in items:
        key, name = parts(item["pointer"])
        value = record[key][name] if key == "vitals" else record[key][int(name)]
        page = pages[item["page"] - 1]
        if key == "vitals":
            page["vitals"][name] = value
        else:
            page[key].append(value)
    return pages


def decisions_between(filed: dict[str, Any], target: dict[str, Any]) -> list[Decision]:
    """The decisions that turn the record ``filed`` into ``target`` (what a careful reviewer with
    the right record at hand decides; ``bench/review_loop.py``'s scripted reviewer): items
    paired by name, case aside; a right item accepted, a wrong field corrected (or cleared), an
    item ``target`` lacks rejected, one it adds appended (on page 1). :func:`corrected` of them
    gives ``target``, its items in another order where some were added."""
    decisions: list[Decision] = []
    for key in (*ITEM_MODELS, *STRING_LISTS):
        wanted = list(target[key])
        for i, item in enumerate(filed[key]):
            name = (item["name"] if isinstance(item, dict) else item).casefold()
            match = next((w for w in wanted if (w["name"] if isinstance(w, dict) else w).casefold() == name), None)
            pointer = json_pointer(key, i)
            if match is None:
                decisions.append(Decision(pointer, "reject"))
                continue
            wanted.remove(match)
            if not isinstance(item, dict):
                decisions.append(Decision(pointer, "accept") if item == match else Decision(pointer, "correct", match))
                continue
            changed = [f for f in ITEM_MODELS[key].model_fields if item.get(f, "") != match.get(f, "")]
            decisions += [Decision(f"{pointer}/{f}", "correct", match[f]) if match.get(f)
                          else Decision(f"{pointer}/{f}", "reject") for f in changed]
            if not changed:
                decisions.append(Decision(pointer, "accept"))
        decisions += [Decision(f"/{key}", "add", w, page=1) for w in wanted]
    for name, value in filed["vitals"].items():
        pointer = json_pointer("vitals", name)
        if name not in target["vitals"]:
            decisions.append(Decision(pointer, "reject"))
        else:
            decisions.append(Decision(pointer, "accept") if value == target["vitals"][name] else
                             Decision(pointer, "correct", target["vitals"][name]))
    decisions += [Decision(json_pointer("vitals", name), "add", value, page=1)
                  for name, value in target["vitals"].items() if name not in filed["vitals"]]
    return decisions


def outcome(decisions: list[Decision]) -> str:
    """A finished review's status: "corrected" when anything changed, else "accepted"."""
    return "corrected" if any(d.action != "accept" for d in decisions) else "accepted"
