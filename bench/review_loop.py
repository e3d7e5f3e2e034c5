#!/usr/bin/env python3
"""The reviewer's loop, measured (issue 48): documents of one kind, filed for review and
corrected through the review store, trained on by phase 5, scored on that kind of page.

    python bench/review_loop.py --profile small --workdir WD [--kind lab_results] [--documents 300]
                                [--model ocr] [--reviewed-workdir DIR] [--concurrency 8]

WD holds a finished run (phases 1-7). Then:

1. ``--documents`` pages of ``--kind``, of seeds no other part of the pipeline uses
   (``REVIEW_SEED``), are rendered;
2. a server on WD (``--model``: by default the OCR + rules baseline, which needs no GPU) with a
   review store in DIR/review files each page (``POST /extract?review=true``);
3. a scripted reviewer corrects each filed record to the page's truth through
   ``PUT /review/{id}``: accepts what is right, corrects wrong fields, rejects invented items,
   adds missed ones (:func:`medvl.review.decisions.decisions_between`);
4. ``GET /review/export`` is saved as DIR/reviewed.jsonl;
5. phases 1-7 run in DIR with ``data.reviewed_records`` (1-4 copied from WD, so the same model,
   split and test pages);
6. the fine-tuned model of DIR against WD's on the same test cases: the paired difference of
   extraction F1 on the pages of ``--kind`` and on the others, each with its interval.

Writes WD/benchmarks/review_loop.json.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from medvl.core.io import atomic_write_json, atomic_write_text, read_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.evaluation import scoring
from medvl.http.validate import running_server
from medvl.medical.documents import KINDS, REVIEW_SEED, document_png, generate_document
from medvl.pipeline.runner import log, run_tool
from medvl.review.decisions import decisions_between

REVIEWER = "bench.review_loop"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", default="lab_results", choices=KINDS, help="the kind of document reviewed")
    parser.add_argument("--documents", type=int, default=300, help="documents filed and corrected")
    parser.add_argument("--model", default="ocr", help="what the filing server serves (its --model): ocr, best, ...")
    parser.add_argument("--reviewed-workdir", default=None,
                        help="where the run trained on the corrections goes (default: WORKDIR/experiments/review_loop)")
    parser.add_argument("--concurrency", type=int, default=8, help="pages filed at once")


def file_and_correct(base: str, documents: list[Any], concurrency: int, client: httpx.Client) -> dict[str, Any]:
    """File every document's page, then correct each to its truth; counts of what was decided."""
    actions: dict[str, int] = {}

    def one(doc: Any) -> str:
        page = document_png(doc)
        filed = client.post(f"{base}/extract?review=true", files={"file": (f"{doc.doc_id}.png", page, "image/png")},
                           timeout=600)
        filed.raise_for_status()
        doc_id = filed.json()["review_id"]
        shown = client.get(f"{base}/review/{doc_id}", timeout=60).json()
        decisions = [d.as_dict() for d in decisions_between(shown["result"]["structured"], doc.structured())]
        saved = client.put(f"{base}/review/{doc_id}", timeout=60, json={
            "version": shown["version"], "status": "done", "reviewer": REVIEWER, "decisions": decisions})
        saved.raise_for_status()
        for d in decisions:
            actions[d["action"]] = actions.get(d["action"], 0) + 1
        return saved.json()["status"]

    with ThreadPoolExecutor(concurrency) as pool:
        statuses = list(pool.map(one, documents))
    return {"documents": len(documents), "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
            "decisions": actions}


def export(base: str, path: Path, client: httpx.Client) -> int:
    """GET /review/export saved at ``path``; the number of rows."""
    response = client.get(f"{base}/review/export", timeout=600)
    response.raise_for_status()
    atomic_write_text(path, response.text)
    return len(response.text.splitlines())


def kind_comparison(reviewed: Workdir, plain: Workdir, kind: str) -> dict[str, Any]:
    """The fine-tuned models of both runs on the same test cases: the paired F1 difference on the
    pages of ``kind`` and on the others, with the per-run figures."""
    scores = {name: read_json(wd.bench("evaluation_finetuned"))["models"]["finetuned"]["scores"]
              for name, wd in (("reviewed", reviewed), ("plain", plain))}
    out: dict[str, Any] = {}
    for label, keep in ((kind, lambda r: kind in r["case_id"]), (f"not {kind}", lambda r: kind not in r["case_id"])):
        rows = {name: [r for r in s["per_case"] if r["subset"] == "test" and keep(r)] for name, s in scores.items()}
        by_id = {r["case_id"]: r for r in rows["plain"]}
        mine = [r for r in rows["reviewed"] if r["case_id"] in by_id]
        theirs = [by_id[r["case_id"]] for r in mine]
        out[label] = {"cases": len(mine),
                      "reviewed_f1": scoring.extraction_summary(mine).get("f1"),
                      "plain_f1": scoring.extraction_summary(theirs).get("f1"),
                      "reviewed_minus_plain": scoring.compare_rows(mine, theirs).get("extraction_f1")}
    return out


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> None:
    from variant_run import variant_run  # bench/'s sibling, as the script runs it (tests import the rest)

    folder = (Path(args.reviewed_workdir) if args.reviewed_workdir else wd.root / "experiments" / "review_loop").resolve()
    export_path = folder / "reviewed.jsonl"
    filing: dict[str, Any] = {}
    if not export_path.is_file():
        documents, seed = [], REVIEW_SEED
        while len(documents) < args.documents:
            documents.append(generate_document(seed, args.kind, prefix="rev"))
            seed += 1
        (folder / "review").mkdir(parents=True, exist_ok=True)
        key = os.environ.get("MEDVL_REVIEW_KEY") or _new_key()
        env = {"MEDVL_REVIEW_KEY": key, "MEDVL_DATABASE_URL": f"sqlite:///{folder / 'review' / 'review.db'}"}
        with running_server(wd.root, settings.profile, extra_args=["--model", args.model, "--set",
                                                                    "api.review_store=true"], env=env) as base, \
                httpx.Client() as client:
            filing = file_and_correct(base, documents, args.concurrency, client)
            filing["export_rows"] = export(base, export_path, client)
        log.info("filed and corrected %d %s pages: %s", args.documents, args.kind, filing)
    reviewed = variant_run(settings, wd, folder, [f"data.reviewed_records={export_path}"])
    data = read_json(reviewed.datasets / "formatted" / "data_summary.json")
    result = {**settings.record(("data", "train")), "kind": args.kind, "documents": args.documents,
              "filing_model": args.model, "filing": filing or None, "trained_on": data.get("reviewed"),
              "test_split": kind_comparison(reviewed, wd, args.kind),
              "command": f"python bench/review_loop.py --profile {settings.profile} --kind {args.kind} "
                         f"--documents {args.documents} --model {args.model}"}
    atomic_write_json(wd.bench("review_loop"), result)
    for label, figures in result["test_split"].items():
        d = figures["reviewed_minus_plain"]
        if d:
            log.info("test split, %s (%d pages): F1 %+.3f [%+.3f, %+.3f] -> %s", label, figures["cases"],
                     d["difference"], *d["ci95"], d["verdict"])


def _new_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


if __name__ == "__main__":
    run_tool("review_loop", (7,), main, __doc__, add_arguments)
