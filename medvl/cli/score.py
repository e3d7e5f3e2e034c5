"""``medvl-score``: score any model's answers on phase 7's cases, as phase 7 scores its own.

Phase 7 writes ``benchmarks/eval_cases.jsonl`` (one case per line: ``case_id``, ``subset``,
``source``, ``image``, ``prompt``, ``reference``). Answer those cases anywhere (vLLM serving
the AWQ checkpoint, another fine-tune, a cloud service), write one JSON line per case,
``{"case_id": ..., "answer": ...}``, and this command writes the same figures phase 7 reports:
per subset and per source, ``extraction`` (precision, recall, F1, name recall, each with a
bootstrap ``ci95``) and ``free_text`` (ROUGE-L). Phase 7's own answers are in
``benchmarks/eval_answers_<model>.jsonl``, so a run's figures can be checked end to end::

    medvl-score --cases benchmarks/eval_cases.jsonl \\
        --answers benchmarks/eval_answers_finetuned.jsonl --out my_scores.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from medvl.core.io import atomic_write_json
from medvl.evaluation.scoring import Case, read_cases, score_answers

log = logging.getLogger("medvl.score")


def read_answers(path: Path, cases: list[Case]) -> dict[str, str]:
    """case_id -> answer; a malformed line, a repeated or unknown case_id is a ValueError."""
    known = {c.case_id for c in cases}
    answers: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            case_id, answer = data["case_id"], data["answer"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: line {number} is not {{\"case_id\", \"answer\"}} ({exc})") from None
        if not isinstance(answer, str):
            raise ValueError(f"{path}: line {number}: answer must be a string")
        if case_id in answers:
            raise ValueError(f"{path}: line {number}: case {case_id!r} answered twice")
        if case_id not in known:
            raise ValueError(f"{path}: line {number}: case {case_id!r} is not in the cases file")
        answers[case_id] = answer
    return answers


def summary_lines(scores: dict[str, Any]) -> list[str]:
    """One line per subset and source: extraction P/R/F1 with F1's interval, ROUGE-L."""
    lines = [f"{'group':<22}{'cases':>6}{'precision':>11}{'recall':>8}{'F1':>7}  {'F1 95% CI':<16}{'ROUGE-L':>8}"]
    for key in ("subsets", "sources"):
        for name, group in scores[key].items():
            ex, ft = group["extraction"], group["free_text"]
            rec = (f"{ex['precision']['value']:>11.3f}{ex['recall']['value']:>8.3f}{ex['f1']['value']:>7.3f}  "
                   f"[{ex['f1']['ci95'][0]:.3f}, {ex['f1']['ci95'][1]:.3f}] " if ex["cases"] else f"{'-':>11}{'-':>8}{'-':>7}  {'':<16}")
            rouge = f"{ft['rouge_l']['value']:>8.3f}" if ft["cases"] else f"{'-':>8}"
            lines.append(f"{key[:-1] + ' ' + name:<22}{group['cases']:>6}{rec}{rouge}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medvl-score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, required=True, help="phase 7's benchmarks/eval_cases.jsonl")
    parser.add_argument("--answers", type=Path, required=True,
                        help='JSON lines {"case_id": ..., "answer": ...}; a case without a line scores as empty')
    parser.add_argument("--out", type=Path, help="write the scores JSON here (default: print the summary only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cases = read_cases(args.cases.read_text().splitlines())
        answers = read_answers(args.answers, cases)
    except (OSError, ValueError) as exc:
        log.error("medvl-score: %s", exc)
        return 2
    scores = score_answers(cases, answers)
    if scores["unanswered"]:
        log.warning("%d of %d cases have no answer: scored as empty answers", scores["unanswered"], len(cases))
    if args.out:
        atomic_write_json(args.out, scores)
        log.info("wrote %s", args.out)
    sys.stdout.write("\n".join(summary_lines(scores)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
