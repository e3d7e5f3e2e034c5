"""Scoring extraction answers against a document's ground truth.

What counts as a match is what a clinician would accept: case and whitespace do not
matter, "500mg" equals "500 mg", "7.20" equals "7.2", unicode dashes equal "-". Recall is
measured separately for terms (drugs, conditions, analytes, findings, frequencies) and
values (doses, lab values, vitals); accuracy is their mean. Precision looks the other way:
every medical-lexicon term in the answer that the document does not contain is a
hallucination. Items are also grouped by category (drug, dose, abbreviation, lab value,
unit, flag) so the error analysis can name what is missed most.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from medvl import lexicon
from medvl.documents import MedicalDocument

_DASHES = dict.fromkeys(map(ord, "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"), "-")
_UNITS = r"mg|mcg|g|units|mmol/l|mg/dl|g/dl|ng/ml|u/l|miu/l|mmhg|bpm|%|ml|l|kg"


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
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure of a free-text answer against its reference (rouge-score: longest
    common subsequence of lowercased, stemmed word tokens). Free-text answers (captions,
    question answers) have no record to recall terms from; this is how captioning is scored."""
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


@dataclass
class Expected:
    """What a correct reading of one document must contain, by category."""

    terms: list[str]
    values: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    document_text: str = ""

    @classmethod
    def from_document(cls, doc: MedicalDocument) -> Expected:
        abbreviations = [m["frequency"] for m in doc.medications]
        abbreviations += [d for d in doc.diagnoses if re.fullmatch(r"[A-Z][A-Za-z0-9 ]{1,7}", d) and any(c.isupper() for c in d[1:])]
        categories = {
            "drug": [m["name"] for m in doc.medications],
            "dose": [m["dose"] for m in doc.medications],
            "abbreviation": list(dict.fromkeys(abbreviations)),
            "lab_value": [lab["value"] for lab in doc.lab_values],
            "unit": list(dict.fromkeys(lab["unit"] for lab in doc.lab_values)),
            "flag": [f"{lab['name']}:{lab['flag']}" for lab in doc.lab_values if lab["flag"]],
        }
        return cls(doc.expected_terms, doc.expected_values, categories, doc.text)

    @classmethod
    def from_reference(cls, reference: str) -> Expected:
        """For samples without a structured record (captions): lexicon terms and numbers in it."""
        norm = normalize(reference)
        terms = [w for w in lexicon.terms() if contains(norm, w)]
        values = list(dict.fromkeys(re.findall(rf"\d+(?:\.\d+)?\s?(?:{_UNITS})\b", norm)))
        return cls(terms, values, {}, reference)


@dataclass
class Score:
    term_recall: float
    value_recall: float
    accuracy: float
    precision: float
    f1: float
    missed: dict[str, list[str]]
    hallucinated: list[str]
    category_recall: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _recall(norm: str, items: list[str]) -> tuple[float, list[str]]:
    if not items:
        return 1.0, []
    missed = [i for i in items if not contains(norm, i)]
    return 1 - len(missed) / len(items), missed


def _flag_found(answer: str, norm: str, item: str) -> bool:
    """A lab's H/L flag, read from JSON lab objects or written next to the lab's name."""
    name, flag = item.split(":", 1)
    for lab in _json_labs(answer):
        if normalize(str(lab.get("name", ""))) == normalize(name) and str(lab.get("flag", "")).strip().upper() == flag:
            return True
    return re.search(rf"{re.escape(normalize(name))}[^\n,;{{}}]{{0,40}}?\(?\b{flag.lower()}\b\)?", norm) is not None


def _json_labs(answer: str) -> list[dict[str, Any]]:
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end <= start:
        return []
    try:
        data = json.loads(answer[start:end + 1])
    except json.JSONDecodeError:
        return []
    labs = data.get("lab_values") if isinstance(data, dict) else None
    return [lab for lab in labs if isinstance(lab, dict)] if isinstance(labs, list) else []


def score(answer: str, expected: Expected) -> Score:
    """Recall, precision, F1 and per-category misses of one answer."""
    norm = normalize(answer)
    if not norm:
        cats = {c: 0.0 for c, items in expected.categories.items() if items}
        return Score(0.0, 0.0, 0.0, 0.0, 0.0, {"term": expected.terms, "value": expected.values,
                                               **{c: v for c, v in expected.categories.items() if v}}, [], cats)
    term_recall, missed_terms = _recall(norm, expected.terms)
    value_recall, missed_values = _recall(norm, expected.values)
    accuracy = (term_recall + value_recall) / 2

    doc_norm = normalize(expected.document_text)
    mentioned = [w for w in lexicon.terms() if contains(norm, w)]
    hallucinated = [w for w in mentioned if not contains(doc_norm, w)]
    precision = 1.0 if not mentioned else 1 - len(hallucinated) / len(mentioned)
    f1 = 0.0 if precision + accuracy == 0 else 2 * precision * accuracy / (precision + accuracy)

    missed: dict[str, list[str]] = {"term": missed_terms, "value": missed_values}
    category_recall: dict[str, float] = {}
    for category, items in expected.categories.items():
        if not items:
            continue
        if category == "flag":
            lost = [i for i in items if not _flag_found(answer, norm, i)]
        else:
            lost = [i for i in items if not contains(norm, i)]
        missed[category] = lost
        category_recall[category] = 1 - len(lost) / len(items)
    return Score(term_recall, value_recall, accuracy, precision, f1, missed, hallucinated, category_recall)


def aggregate(scores: list[Score]) -> dict[str, Any]:
    """Means over cases, per-category recall, and the most frequent misses per category."""
    if not scores:
        return {"cases": 0}
    mean = {k: sum(getattr(s, k) for s in scores) / len(scores)
            for k in ("term_recall", "value_recall", "accuracy", "precision", "f1")}
    categories: dict[str, list[float]] = {}
    misses: dict[str, Counter] = {}
    for s in scores:
        for c, r in s.category_recall.items():
            categories.setdefault(c, []).append(r)
        for c, items in s.missed.items():
            misses.setdefault(c, Counter()).update(items)
    return {
        "cases": len(scores),
        **mean,
        "hallucinations": sum(len(s.hallucinated) for s in scores),
        "category_recall": {c: sum(v) / len(v) for c, v in categories.items()},
        "most_missed": {c: counter.most_common(5) for c, counter in misses.items() if counter},
    }
