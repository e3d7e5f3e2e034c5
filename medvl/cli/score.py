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

Two models on the same cases: ``--against OTHER.jsonl`` adds the paired differences (answers
minus OTHER: extraction F1 and ROUGE-L, per subset and source, each with its paired bootstrap
interval and verdict), as phase 7 compares fine-tuned with base. ``--cases-matching REGEX`` keeps
the cases whose id matches (``lab_results``: the synthetic lab reports), e.g. what training on
reviewed lab reports changed on lab reports::

    medvl-score --cases eval_cases.jsonl --answers with_reviewed.jsonl \\
        --against without_reviewed.jsonl --cases-matching lab_results
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from medvl.core.io import atomic_write_json
from medvl.evaluation.scoring import Case, compare, read_cases, score_answers

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
    parser.add_argument("--against", type=Path, help="another model's answers to the same cases: adds the paired "
                                                          "differences (--answers minus these) with their intervals")
    parser.add_argument("--cases-matching", metavar="REGEX",
                        help="score only the cases whose case_id matches (re.search), e.g. lab_results")
    parser.add_argument("--out", type=Path, help="write the scores JSON here (default: print the summary only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        every_case = read_cases(args.cases.read_text().splitlines())
        answers = read_answers(args.answers, every_case)
        other = read_answers(args.against, every_case) if args.against else None
        cases = matching(every_case, args.cases_matching)
    except (OSError, ValueError, re.error) as exc:
        log.error("medvl-score: %s", exc)
        return 2
    scores = score_answers(cases, answers)
    if scores["unanswered"]:
        log.warning("%d of %d cases have no answer: scored as empty answers", scores["unanswered"], len(cases))
    lines = summary_lines(scores)
    if other is not None:
        scores["against"] = {"answers": str(args.against), **compare(scores, score_answers(cases, other))}
        lines += difference_lines(scores["against"])
    if args.cases_matching:
        scores["cases_matching"] = args.cases_matching
    if args.out:
        atomic_write_json(args.out, scores)
        log.info("wrote %s", args.out)
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def matching(cases: list[Case], pattern: str | None) -> list[Case]:
    """The cases whose id matches ``pattern`` (all without one); none matching is an error."""
    if not pattern:
        return cases
    kept = [case for case in cases if re.search(pattern, case.case_id)]
    if not kept:
        raise ValueError(f"no case id matches {pattern!r}")
    return kept


def difference_lines(against: dict[str, Any]) -> list[str]:
    """One line per subset and source: the paired F1 difference, its interval and verdict."""
    lines = [f"paired against {against['answers']}:"]
    for key in ("subsets", "sources"):
        for name, diff in against[key].items():
            if "extraction_f1" in diff:
                d = diff["extraction_f1"]
                lines.append(f"  {key[:-1] + ' ' + name:<22} F1 {d['difference']:+.3f} "
                             f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] {d['verdict']}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
