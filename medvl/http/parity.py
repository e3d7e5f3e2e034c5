"""Served parity: what the running server's /extract scores against what phase 7 scored.

Phase 7 answers the test split in-process, one request at a time. Users get their answers from
the server: the upload decoded, the page's OCR read by the server (grounded prompts), /extract's
own prompt, requests batched with others. Phase 8 sends the same test pages to /extract over
HTTP, several clients at once, scores the answers with the same scorer and pairs them case by
case with phase 7's: a prompt, pixel budget, grounding or decoding that differs between the two
shows as a difference whose 95% interval excludes zero, and gate 8 fails on it.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from medvl.evaluation import scoring
from medvl.evaluation.scoring import Case


def read_answers(path: Path) -> dict[str, str]:
    """case_id -> answer, from an ``eval_answers_<model>.jsonl`` phase 7 wrote."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["case_id"]: row["answer"] for row in rows}


def served_answers(base: str, root: Path, cases: list[Case], clients: int,
                   timeout_s: float = 300.0) -> tuple[dict[str, str], list[str]]:
    """Each case's page sent to /extract as its stored bytes (``clients`` at once); the answers
    (the model's raw text) and the cases whose request failed, with why."""
    def ask(case: Case) -> tuple[str, str | None, str | None]:
        page = root / case.image
        kind = "application/pdf" if page.suffix == ".pdf" else "image/png"
        try:
            response = client.post("/extract", files={"file": (page.name, page.read_bytes(), kind)})
        except httpx.HTTPError as exc:
            return case.case_id, None, f"{case.case_id}: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return case.case_id, None, f"{case.case_id}: HTTP {response.status_code} {response.text[:200]}"
        return case.case_id, response.json()["raw_text"], None

    with httpx.Client(base_url=base, timeout=timeout_s) as client, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(ask, cases))
    answers = {case_id: text for case_id, text, _ in results if text is not None}
    return answers, [error for *_, error in results if error]


def served_parity(base: str, root: Path, cases_path: Path, answers_path: Path, clients: int = 4) -> dict[str, Any]:
    """The test split's record pages through /extract (``clients`` at once), scored and paired
    with phase 7's answers (``answers_path``) on the same cases (``cases_path``): :func:`parity`."""
    cases = [c for c in scoring.read_cases(cases_path.read_text().splitlines()) if c.subset == "test" and c.record]
    if not cases:
        return {"ok": False, "detail": "the test split holds no record page to send to /extract"}
    answers, errors = served_answers(base, root, cases, clients)
    return {**parity(cases, answers, read_answers(answers_path), errors), "clients": clients}


def parity(cases: list[Case], served: dict[str, str], evaluated: dict[str, str], errors: list[str]) -> dict[str, Any]:
    """Served answers against phase 7's on the same cases, both scored by the same scorer:
    ``ok`` unless a request failed (``errors``) or the paired 95% interval of served minus
    phase 7 (extraction F1) excludes zero."""
    answered = [c for c in cases if c.case_id in served]
    if not answered:
        return {"ok": False, "cases": len(cases), "failed_requests": errors[:5],
                "detail": f"no test page answered: {errors[:2]}"}
    scores = scoring.score_answers(answered, served)
    phase7 = scoring.score_answers(answered, {c.case_id: evaluated[c.case_id] for c in answered})
    difference = scoring.compare(scores, phase7)["subsets"]["test"]["extraction_f1"]
    same = sum(served[c.case_id] == evaluated[c.case_id] for c in answered)
    f1, f1_phase7 = scores["subsets"]["test"]["extraction"]["f1"], phase7["subsets"]["test"]["extraction"]["f1"]
    return {
        "ok": not errors and difference["verdict"] == "no significant difference",
        "cases": len(cases), "failed_requests": errors[:5], "served_f1": f1, "phase7_f1": f1_phase7,
        "served_minus_phase7": difference, "identical_answers": same,
        "detail": (f"{len(answered)}/{len(cases)} test pages answered by /extract; F1 served {f1['value']:.3f} vs "
                   f"phase 7 {f1_phase7['value']:.3f}, difference {difference['difference']:+.3f} "
                   f"[{difference['ci95'][0]:+.3f}, {difference['ci95'][1]:+.3f}] ({difference['verdict']}); "
                   f"{same} answers identical" + (f"; {len(errors)} requests failed" if errors else "")),
    }
