"""Scoring answers against references: records field by field, free text by ROUGE-L.

Why records are scored as records: the scorer this replaces looked for the reference's words
anywhere in the answer. Moving every dose and frequency to the wrong drug still scored 1.00 on
all five suite documents, and a caption with no lexicon term in it gave any answer ("ok") full
marks, because the recall of nothing is 1. Here an extraction answer is parsed into the record
(:func:`medvl.medical.records.parse_structured`: JSON, else what the repair pass recovers, else the
lexicon fallback, and the case says which), and its items are matched as tuples:

- a medication is name + dose + route + frequency, a lab is analyte + value + unit + flag, a
  vital is its name + value, diagnoses and procedures are names;
- an answered item pairs with the expected item of the same name (one each; full agreement
  first, so a drug listed twice pairs its right line);
- an item is correct only when every field of the pair agrees, so a dose given to the wrong
  drug makes both drugs wrong;
- precision = correct / items answered, recall = correct / items expected, micro-averaged
  over items (by type and overall); name recall (the names alone) is a secondary figure, and
  each field's agreement among paired items says which field goes wrong.

Matching is clinical, not literal: case, spacing and dashes do not matter, "500mg" equals
"500 mg", "7.20" equals "7.2", a condition's abbreviation equals its full name ("DM2" =
"Type 2 diabetes mellitus"), a flag "high" equals "H".

Free-text references (captions, question answers, transcriptions) have no record: they are
scored with ROUGE-L only and never enter an extraction figure. Every headline figure carries
a bootstrap 95% interval over cases, and a comparison of two models is a paired bootstrap of
their difference, whose interval gives the verdict ("better", "worse", "no significant
difference"). The resampling is seeded, so ``medvl-score`` reproduces phase 7's figures.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from medvl.medical import lexicon
from medvl.medical.records import json_pointer, parse_structured

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"), "-")
_UNITS = r"mg|mcg|g|units|mmol/l|mg/dl|g/dl|ng/ml|u/l|miu/l|mmhg|bpm|%|ml|l|kg"

# The record's item types and the fields (beside the name) that must agree for an item to count.
ITEM_FIELDS: dict[str, tuple[str, ...]] = {
    "medications": ("dose", "route", "frequency"),
    "lab_values": ("value", "unit", "flag"),
    "vitals": ("value",),
    "diagnoses": (),
    "procedures": (),
}
# Resamples of the bootstrap and its seed: fixed, so every scorer run gives the same intervals.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
_FLAGS = {"high": "h", "low": "l", "abnormal high": "h", "abnormal low": "l", "normal": "", "n": "", "-": ""}


def normalize(text: str) -> str:
    """Lowercase, unify dashes and spaces, drop trailing decimal zeros, space number+unit."""
    text = (text or "").translate(_DASHES).lower()
    text = re.sub(r"(\d+)\.(\d*?)0+\b", lambda m: m.group(1) + ("." + m.group(2) if m.group(2) else ""), text)
    text = re.sub(rf"(\d)\s*({_UNITS})\b", r"\1 \2", text)
    return re.sub(r"\s+", " ", text).strip()


def contains(haystack_normalized: str, item: str) -> bool:
    """Whole-token match of a normalised item inside a normalised text."""
    needle = normalize(item)
    if not needle:
        return False
    return re.search(rf"(?<![\w.]){re.escape(needle)}(?![\w])", haystack_normalized) is not None


@lru_cache(maxsize=1)
def _condition_names() -> dict[str, str]:
    """Normalised abbreviation and full name of each condition -> one canonical name."""
    names = {}
    for full, abbr in lexicon.CONDITIONS:
        for word in (full, abbr):
            if word:
                names[normalize(word)] = normalize(full)
    return names


def canonical_name(item_type: str, name: str) -> str:
    """The name items are paired by: normalised; a condition's abbreviation mapped to its full
    name; a vital's key as a snake_case word ("Heart rate" = "heart_rate")."""
    norm = normalize(name)
    if item_type == "vitals":
        return re.sub(r"[^a-z0-9]+", "_", norm).strip("_")
    if item_type == "diagnoses":
        return _condition_names().get(norm, norm)
    return norm


def canonical_field(name: str, value: str) -> str:
    norm = normalize(value)
    return _FLAGS.get(norm, norm) if name == "flag" else norm


@lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure of a free-text answer against its reference (rouge-score: longest
    common subsequence of lowercased, stemmed word tokens)."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One evaluation case, as ``benchmarks/eval_cases.jsonl`` holds it.

    ``reference`` is the expected record (a dict) for an extraction case, or the reference
    text for a free-text one; ``image`` is relative to the run folder; ``source`` names where
    the case comes from (suite, synthetic, roco, pubmedvision, mtsamples)."""

    case_id: str
    subset: str
    source: str
    image: str
    prompt: str
    reference: dict[str, Any] | str

    @property
    def record(self) -> bool:
        """Whether the answer is an extraction record (decoded under the record's schema)."""
        return isinstance(self.reference, dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_cases(lines: list[str]) -> list[Case]:
    """Cases from JSON lines; a line that is not a case is a ValueError naming it."""
    cases = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            cases.append(Case(**{k: data[k] for k in ("case_id", "subset", "source", "image", "prompt", "reference")}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"cases line {number} is not a case ({type(exc).__name__}: {exc})") from None
    if len({c.case_id for c in cases}) != len(cases):
        raise ValueError("cases: case_id values repeat")
    return cases


# --------------------------------------------------------------------------- one record


@dataclass(frozen=True)
class _Item:
    name: str
    fields: tuple[str, ...]
    text: str  # how the item reads in an error analysis
    pointer: str = field(default="", compare=False)  # where it is in its record (RFC 6901)


def record_items(record: dict[str, Any]) -> dict[str, list[_Item]]:
    """A record's items by type, with canonical names and field values."""
    out: dict[str, list[_Item]] = {}
    for item_type, names in ITEM_FIELDS.items():
        raw = record.get(item_type) or ([] if item_type != "vitals" else {})
        if item_type == "vitals":
            entries = [{"name": k, "value": v} for k, v in raw.items()] if isinstance(raw, dict) else []
        elif names:
            entries = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
        else:
            entries = [{"name": e} for e in raw if isinstance(e, (str, int, float))] if isinstance(raw, list) else []
        items = []
        for index, entry in enumerate(entries):
            name = canonical_name(item_type, str(entry.get("name", "")))
            if not name:
                continue
            values = tuple(canonical_field(f, str(entry.get(f, ""))) for f in names)
            pointer = json_pointer(item_type, entry["name"] if item_type == "vitals" else index)
            items.append(_Item(name, values, " ".join([str(entry.get("name", ""))]
                                                      + [str(entry.get(f, "")) for f in names if entry.get(f)]), pointer))
        out[item_type] = items
    return out


def _pair(expected: list[_Item], answered: list[_Item]) -> tuple[list[tuple[_Item, _Item]], list[_Item], list[_Item]]:
    """Pair answered items with expected ones of the same name: (pairs, unpaired expected,
    unpaired answered). Items that agree in every field pair first."""
    free = list(expected)
    pairs: list[tuple[_Item, _Item]] = []
    left = list(answered)
    for whole in (True, False):
        rest = []
        for item in left:
            match = next((e for e in free if e.name == item.name and (not whole or e.fields == item.fields)), None)
            if match is None:
                rest.append(item)
            else:
                free.remove(match)
                pairs.append((match, item))
        left = rest
    return pairs, free, left


def item_verdicts(answer: dict[str, Any], reference: dict[str, Any]) -> dict[str, bool]:
    """Each item of the ``answer`` record (by pointer) -> whether :func:`score_record` counts it
    correct: paired with an expected item of the same name and agreeing in every field (an item
    the reference lacks, or a second one of a name, is wrong)."""
    want, got = record_items(reference), record_items(answer)
    verdicts = {}
    for item_type in ITEM_FIELDS:
        pairs, _, extra = _pair(want[item_type], got[item_type])
        verdicts.update({a.pointer: e.fields == a.fields for e, a in pairs})
        verdicts.update({a.pointer: False for a in extra})
    return verdicts


@dataclass
class RecordScore:
    """One extraction answer against its reference record: counts per item type (what the
    micro averages and the bootstrap add up), field agreement, and what was missed or invented."""

    parse_status: str
    counts: dict[str, dict[str, int]]  # type -> expected, answered, correct, named
    fields: dict[str, list[int]]  # "medications.dose" -> [agreeing, paired]
    missed: list[str] = field(default_factory=list)  # expected items not answered correctly
    invented: list[str] = field(default_factory=list)  # answered items whose name the reference lacks

    def totals(self) -> dict[str, int]:
        return {k: sum(c[k] for c in self.counts.values()) for k in ("expected", "answered", "correct", "named")}


def score_record(answer: str, reference: dict[str, Any]) -> RecordScore:
    """Parse ``answer`` into the record and match it against ``reference`` item by item."""
    parsed, status = parse_structured(answer or "")
    want, got = record_items(reference), record_items(parsed)
    counts, fields, missed, invented = {}, {}, [], []
    for item_type, names in ITEM_FIELDS.items():
        pairs, unpaired, extra = _pair(want[item_type], got[item_type])
        correct = [e for e, a in pairs if e.fields == a.fields]
        counts[item_type] = {"expected": len(want[item_type]), "answered": len(got[item_type]),
                             "correct": len(correct), "named": len(pairs)}
        for i, name in enumerate(names):
            fields[f"{item_type}.{name}"] = [sum(e.fields[i] == a.fields[i] for e, a in pairs), len(pairs)]
        missed += [f"{item_type}: {e.text}" for e, a in pairs if e.fields != a.fields]
        missed += [f"{item_type}: {e.text}" for e in unpaired]
        invented += [f"{item_type}: {a.text}" for a in extra]
    return RecordScore(status, counts, fields, missed, invented)


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def record_figures(totals: dict[str, int]) -> dict[str, float]:
    """Micro precision, recall, F1 and name recall from summed counts (0 where undefined: an
    answer that lists nothing has precision 0, not 1)."""
    c, a, e = totals["correct"], totals["answered"], totals["expected"]
    return {"precision": _ratio(c, a), "recall": _ratio(c, e), "f1": _ratio(2 * c, a + e),
            "name_recall": _ratio(totals["named"], e)}


# --------------------------------------------------------------------------- many cases


def score_case(case: Case, answer: str) -> dict[str, Any]:
    """One case's score row: the record's counts, or the free-text answer's ROUGE-L."""
    row: dict[str, Any] = {"case_id": case.case_id, "subset": case.subset, "source": case.source,
                           "record": case.record}
    if case.record:
        s = score_record(answer, case.reference)  # type: ignore[arg-type]
        by_type = {t: record_figures(c) for t, c in s.counts.items()}
        return {**row, "parse_status": s.parse_status, "counts": s.counts, "fields": s.fields,
                **record_figures(s.totals()), "by_type": by_type, "missed": s.missed, "invented": s.invented}
    return {**row, "rouge_l": rouge_l(answer or "", case.reference)}  # type: ignore[arg-type]


def _bootstrap_indices(n: int) -> np.ndarray:
    """The resampled case indices for a group of ``n`` cases (the same for every model, so
    paired differences resample the same cases)."""
    return np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))


def _interval(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


_TOTALS = ("expected", "answered", "correct", "named")


def _counts(rows: list[dict[str, Any]]) -> np.ndarray:
    """Each record row's summed counts over item types, ``[cases, 4]`` in :data:`_TOTALS` order."""
    return np.array([[sum(c[k] for c in r["counts"].values()) for k in _TOTALS] for r in rows], dtype=np.int64)


def _totals(counts: np.ndarray) -> dict[str, int]:
    return {k: int(v) for k, v in zip(_TOTALS, counts.sum(axis=0), strict=True)}


def _record_samples(counts: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Each record figure over the bootstrap resamples ``idx`` of the cases' ``counts``."""
    e, a, c, named = (counts[idx][..., i].sum(axis=1).astype(float) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"precision": np.nan_to_num(c / a), "recall": np.nan_to_num(c / e),
                "f1": np.nan_to_num(2 * c / (a + e)), "name_recall": np.nan_to_num(named / e)}


def extraction_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Micro figures with 95% intervals, per type, per field, parse status and error analysis."""
    if not rows:
        return {"cases": 0}
    counts = _counts(rows)
    totals = _totals(counts)
    point = record_figures(totals)
    samples = _record_samples(counts, _bootstrap_indices(len(rows)))
    by_type = {}
    for item_type in ITEM_FIELDS:
        type_totals = {k: sum(r["counts"][item_type][k] for r in rows) for k in _TOTALS}
        if not type_totals["expected"] and not type_totals["answered"]:
            continue
        by_type[item_type] = {**record_figures(type_totals), **type_totals}
    fields = {}
    for key in rows[0]["fields"]:
        agree, paired = (sum(r["fields"][key][i] for r in rows) for i in (0, 1))
        if paired:
            fields[key] = {"agreement": agree / paired, "paired": paired}
    return {"cases": len(rows), **{k: {"value": point[k], "ci95": _interval(samples[k])} for k in point},
            "items": totals, "by_type": by_type, "fields": fields,
            "parse_status": dict(Counter(r["parse_status"] for r in rows)),
            "most_missed": Counter(m for r in rows for m in r["missed"]).most_common(5),
            "most_invented": Counter(m for r in rows for m in r["invented"]).most_common(5)}


def free_text_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"cases": 0}
    values = np.array([r["rouge_l"] for r in rows])
    samples = values[_bootstrap_indices(len(rows))].mean(axis=1)
    return {"cases": len(rows), "rouge_l": {"value": float(values.mean()), "ci95": _interval(samples)}}


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A group of case rows: its extraction figures and its free-text figures, apart."""
    return {"cases": len(rows), "extraction": extraction_summary([r for r in rows if r["record"]]),
            "free_text": free_text_summary([r for r in rows if not r["record"]])}


def grouped(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Figures per subset (suite, test) and per source (suite, synthetic, roco, ...)."""
    return {key: {name: summarize_rows([r for r in rows if r[key] == name]) for name in sorted({r[key] for r in rows})}
            for key in ("subset", "source")}


def score_answers(cases: list[Case], answers: dict[str, str]) -> dict[str, Any]:
    """The scores phase 7 reports and ``medvl-score`` writes: per case, per subset and per
    source. A case without an answer is scored as an empty answer and counted."""
    rows = [score_case(case, answers.get(case.case_id, "")) for case in cases]
    groups = grouped(rows)
    return {"cases": len(cases), "unanswered": sum(c.case_id not in answers for c in cases),
            "subsets": groups["subset"], "sources": groups["source"], "per_case": rows}


# --------------------------------------------------------------------------- comparing two models


def verdict(interval: list[float]) -> str:
    """What a difference's 95% interval says: never read from the point estimate alone."""
    low, high = interval
    return "better" if low > 0 else "worse" if high < 0 else "no significant difference"


def _difference(a: np.ndarray, b: np.ndarray, point: float) -> dict[str, Any]:
    interval = _interval(a - b)
    return {"difference": point, "ci95": interval, "verdict": verdict(interval)}


def compare_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> dict[str, Any]:
    """A minus B on the same cases (paired bootstrap): extraction F1 and free-text ROUGE-L."""
    out: dict[str, Any] = {}
    rec_a, rec_b = [r for r in rows_a if r["record"]], [r for r in rows_b if r["record"]]
    if rec_a:
        idx = _bootstrap_indices(len(rec_a))
        ca, cb = _counts(rec_a), _counts(rec_b)
        point = record_figures(_totals(ca))["f1"] - record_figures(_totals(cb))["f1"]
        out["extraction_f1"] = _difference(_record_samples(ca, idx)["f1"], _record_samples(cb, idx)["f1"], point)
    free_a, free_b = [r for r in rows_a if not r["record"]], [r for r in rows_b if not r["record"]]
    if free_a:
        idx = _bootstrap_indices(len(free_a))
        va, vb = (np.array([r["rouge_l"] for r in rows]) for rows in (free_a, free_b))
        out["rouge_l"] = _difference(va[idx].mean(axis=1), vb[idx].mean(axis=1), float(va.mean() - vb.mean()))
    return out


def compare(scores_a: dict[str, Any], scores_b: dict[str, Any]) -> dict[str, Any]:
    """Paired differences (A - B) per subset and per source, from two :func:`score_answers`
    results over the same cases."""
    by_id = {r["case_id"]: r for r in scores_b["per_case"]}
    rows_a = scores_a["per_case"]
    if set(by_id) != {r["case_id"] for r in rows_a}:
        raise ValueError("compare: the two scores are not over the same cases")
    rows_b = [by_id[r["case_id"]] for r in rows_a]
    out: dict[str, Any] = {}
    for key, name in (("subset", "subsets"), ("source", "sources")):
        out[name] = {}
        for group in sorted({r[key] for r in rows_a}):
            keep = [i for i, r in enumerate(rows_a) if r[key] == group]
            out[name][group] = compare_rows([rows_a[i] for i in keep], [rows_b[i] for i in keep])
    return out


def headline(group: dict[str, Any]) -> dict[str, Any]:
    """A group's headline figures, each ``{"value", "ci95"}``: extraction precision, recall,
    F1 and name recall where it has record cases, ROUGE-L where it has free-text ones."""
    ex, ft = group.get("extraction") or {}, group.get("free_text") or {}
    out = {k: ex[k] for k in ("precision", "recall", "f1", "name_recall")} if ex.get("cases") else {}
    if ft.get("cases"):
        out["rouge_l"] = ft["rouge_l"]
    return out
