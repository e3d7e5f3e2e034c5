"""Phase 7: base versus fine-tuned, on documents neither has seen, merged the right way.

Order matters for the fine-tuned model: merging LoRA weights into a 4-bit base is lossy
(the merged deltas are re-quantized layer by layer against the already-rounded weights),
so the adapter is merged into a full-precision base, the merged model saved, and that model
quantized to NF4 for evaluation and serving, the same deployment form as the NF4 control.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from medvl.core.io import atomic_dir, atomic_write_bytes
from medvl.core.stats import summarize
from medvl.engine.grammar import RECORD_FORMAT
from medvl.engine.pages import PageLimits, decode_pages
from medvl.evaluation import benchmark, scoring
from medvl.evaluation.scoring import Case
from medvl.medical.confidence import calibration, item_confidences
from medvl.medical.documents import pdf_ground_truth, save_document, save_pdf_document
from medvl.medical.prompts import EXTRACTION_PROMPT, OCR_HEADER, ocr_grounded
from medvl.medical.records import (
    document_result,
    empty_structured,
    is_valid_record,
    merge_pages,
    record_answer,
    structured_result,
)
from medvl.medical.suite import MULTI_PAGE_CASE, evaluation_documents, multi_page_document
from medvl.model import memory

log = logging.getLogger(__name__)


QUALITY_WORDS = {
    "real": "Quality numbers are from the real model.",
    "control": "Quality numbers are from the positive control: a stand-in pre-trained here on reading pages back, "
               "then fine-tuned (model.pretrain_steps). They show whether the pipeline teaches what it measures, "
               "not how well the real 7B reads.",
    "random": "Quality numbers are from a random stand-in and mean nothing about the real model.",
}


def quality_kind(settings: Any) -> str:
    """What a run's quality figures can say: ``real`` (the hub model), ``control`` (a stand-in
    pre-trained in phase 2, the `small` profile) or ``random`` (a random stand-in)."""
    if settings.model.source == "hub":
        return "real"
    return "control" if settings.model.pretrain_steps else "random"


def suite_cases(folder: Path, root: Path) -> list[Case]:
    """Render the hand-written suite to PNG (with ground truth JSON) and wrap it as cases; its
    multi-page case as a two-page PDF whose reference is its pages' records merged."""
    cases = []
    for doc in evaluation_documents():
        image, _ = save_document(doc, folder)
        cases.append(Case(doc.doc_id, "suite", "suite", str(image.relative_to(root)), EXTRACTION_PROMPT,
                          doc.structured()))
    pages = multi_page_document()
    pdf, _ = save_pdf_document(MULTI_PAGE_CASE, pages, folder)
    cases.append(Case(MULTI_PAGE_CASE, "suite", "suite", str(pdf.relative_to(root)), EXTRACTION_PROMPT,
                      pdf_ground_truth(MULTI_PAGE_CASE, pages)["structured"]))
    return cases


def case_pages(path: Path, limits: PageLimits) -> list[Image.Image]:
    """A case's pages: its image, or its PDF rendered, as the server reads uploads."""
    return decode_pages(path.read_bytes(), limits)


def test_split_cases(formatted: Path, root: Path, limit: int) -> list[Case]:
    """Phase-5 test rows: a synthetic row's reference is the record it was trained to answer
    (the page's own record, written by phase 5), a hub row's its reference text."""
    rows = json.loads((formatted / "test.json").read_text())
    if limit:
        rows = rows[:limit]
    cases = []
    for row in rows:
        prompt = row["messages"][0]["content"][1]["text"]
        answer = row["messages"][1]["content"][0]["text"]
        reference = json.loads(answer) if row["source"] == "synthetic" else answer
        cases.append(Case(row["id"], "test", row["source"], str((formatted / row["image"]).relative_to(root)),
                          prompt, reference))
    return cases


def write_cases(path: Path, cases: list[Case]) -> None:
    """``benchmarks/eval_cases.jsonl``: what ``medvl-score`` scores any model's answers against."""
    atomic_write_bytes(path, "".join(json.dumps(c.to_dict(), ensure_ascii=False) + "\n" for c in cases).encode())


def write_answers(path: Path, answers: dict[str, str]) -> None:
    """A model's answers as ``medvl-score`` reads them: ``{"case_id", "answer"}`` per line."""
    atomic_write_bytes(path, "".join(json.dumps({"case_id": k, "answer": v}, ensure_ascii=False) + "\n"
                                     for k, v in answers.items()).encode())


class MergeError(RuntimeError):
    """The adapter does not fit the base, or merging it changed nothing."""


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """LoRA merged into a full-precision base (bf16 on GPU, fp32 on CPU), saved whole.

    Checked on the way, because PEFT only warns: an adapter key that finds no module of the
    base, or a LoRA module the adapter has no weights for, is a :class:`MergeError`; so is a
    merge that changed none of the targeted weights (a mismatched or untrained adapter would
    otherwise be evaluated as "fine-tuned == base").
    """
    import time

    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    started = time.perf_counter()
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    base = AutoModelForImageTextToText.from_pretrained(
        base_dir, dtype=dtype, device_map="auto" if torch.cuda.is_available() else None)
    model = PeftModel(base, PeftConfig.from_pretrained(adapter_dir))
    loaded = model.load_adapter(adapter_dir, "default")
    if loaded.missing_keys or loaded.unexpected_keys:
        raise MergeError(
            f"adapter {adapter_dir.name} does not fit base {base_dir.name}: {len(loaded.missing_keys)} LoRA weights "
            f"missing (e.g. {loaded.missing_keys[:2]}), {len(loaded.unexpected_keys)} adapter weights with no place "
            f"in the base (e.g. {loaded.unexpected_keys[:2]}); was it trained on another model?")
    changed, targeted = merge_lora_in_place(model)
    if not changed:
        raise MergeError(f"merging {adapter_dir.name} changed none of the {targeted} targeted weights in {dtype}: "
                         "the adapter is zero (untrained) or its update is below the weights' precision")
    if changed < targeted:
        log.warning("merging changed %d of %d targeted weights; the rest are unchanged in %s", changed, targeted, dtype)
    merged = model.unload()  # the LoRA layers' base weights now hold the merge
    with atomic_dir(out_dir) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        AutoProcessor.from_pretrained(adapter_dir).save_pretrained(staging)
    del merged, model, base
    memory.free_memory()
    return {"merge_time_s": time.perf_counter() - started, "merged_dtype": str(dtype),
            "targeted_weights": targeted, "changed_weights": changed}


def merge_lora_in_place(model: Any) -> tuple[int, int]:
    """Merge every LoRA layer into its base weight (refusing NaN/inf); returns (changed, targeted)."""
    from peft.tuners.lora import LoraLayer

    changed = targeted = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight
        before = weight.detach().clone()
        module.merge(safe_merge=True)
        targeted += 1
        changed += int(not torch.equal(before, weight.detach()))
    return changed, targeted


def evaluate_model(label: str, loader: Callable[[], Any], processor: Any, cases: list[Case], root: Path,
                   max_new_tokens: int, decode: Any, pdf_limits: PageLimits, ground_pdf_pages: bool = False,
                   review_below: float = 0.5, concurrency: int = 1) -> dict[str, Any]:
    """Generate an answer per case (through the serving engine, per ``decode``), time it with
    the shared harness, and score the answers with :func:`medvl.evaluation.scoring.score_answers` (the
    function ``medvl-score`` runs). A PDF case (rendered per ``pdf_limits``) is answered page by
    page and its records merged, as /extract answers a PDF; with ``ground_pdf_pages`` each of
    its pages gets its own OCR-grounded prompt (a case's one prompt cannot hold every page's lines).
    Each item of a record answer (a PDF's pages merged) gets its confidence (as /extract gives
    it) and the scorer's verdict: ``calibration`` says how well the one predicts the other, with the
    accuracy of items above and below ``review_below`` (api.review_below_confidence).

    ``concurrency`` (bench.eval_concurrency) cases are asked at once, batched by the engine as
    the server batches them: answers come several times faster, and each case's latency is then
    its latency among that many (the JSON says which)."""
    model, load = benchmark.timed_load(loader)
    first = benchmark.BenchSample(cases[0].case_id, root / cases[0].image, cases[0].prompt)
    engine, warm_up_s = benchmark.make_engine(model, processor, decode, first, slots=concurrency)
    if concurrency > 1:
        engine.start()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            rows = list(tqdm(pool.map(lambda case: answer_case(engine, case, root, max_new_tokens, pdf_limits,
                                                               ground_pdf_pages), cases),
                             total=len(cases), desc=f"evaluate {label}", unit="case"))
    finally:
        engine.stop()
    peak = memory.peak_memory_mb()
    memory.unload(model)
    return {
        "label": label,
        "load": load,
        "decoder_warm_up_s": warm_up_s,
        "concurrency": concurrency,
        "peak_memory_mb": peak,
        "memory_kind": memory.memory_kind(),
        "cases": rows,
        "latency_s": summarize([r["latency_s"] for r in rows]),
        "ttft_s": summarize([r["ttft_s"] for r in rows]),
        "scores": scoring.score_answers(cases, answers_of(rows)),
        "flagged_items": flagged_items(rows),
        "decoding": decoding_outcomes(rows),
        "calibration": calibration([(i["confidence"], i["correct"]) for r in rows for i in r.get("items", [])
                                    if i["confidence"] is not None], review_below),
    }


def answer_case(engine: Any, case: Case, root: Path, max_new_tokens: int, pdf_limits: PageLimits,
                ground_pdf_pages: bool) -> dict[str, Any]:
    """One case answered through the engine (a PDF page by page, merged), parsed and judged."""
    pages = case_pages(root / case.image, pdf_limits)
    if len(pages) == 1:
        out = benchmark.generate_timed(engine, pages[0], case.prompt, max_new_tokens,
                                       RECORD_FORMAT if case.record else None, confidences=case.record)
    else:
        from medvl.medical.ocr import grounded_prompt

        prompts = [grounded_prompt(page, case.prompt) if ground_pdf_pages else case.prompt for page in pages]
        out = benchmark.generate_pages_timed(engine, pages, prompts, max_new_tokens, confidences=case.record)
    extracted = structured_result(out["response"])
    return {"case_id": case.case_id, "subset": case.subset, "source": case.source, "record": case.record,
            "response": out["response"], "generated_tokens": out["generated_tokens"],
            "finish_reason": out["finish_reason"], "closed_early": out["closed_early"],
            "latency_s": out["latency_s"], "ttft_s": out["ttft_s"],
            "parse_status": extracted["parse_status"], "flags": extracted["flags"],
            **({"items": judged_items(extracted, out, case.reference)}
               if case.record and extracted["parse_status"] == "json" else {})}


def judged_items(extracted: dict[str, Any], out: dict[str, Any], reference: dict[str, Any]) -> list[dict[str, Any]]:
    """Each item of a record answer (a document's pages merged, for a PDF): its confidence (its
    least sure field's, as /extract gives it) and whether the scorer counts it correct."""
    items = document_result([extracted])["items"]
    if "item_confidence" in out:  # a document's pages, each item scored on the page it was kept from
        for item in items:
            item["confidence"] = out["item_confidence"].get(item["pointer"])
    else:
        item_confidences(items, out["field_confidence"])
    verdicts = scoring.item_verdicts(extracted["structured"], reference)
    return [{"pointer": i["pointer"], "confidence": i["confidence"], "correct": verdicts.get(i["pointer"], False)}
            for i in items]


def answers_of(rows: list[dict[str, Any]]) -> dict[str, str]:
    """case_id -> the answer a model (or baseline) gave."""
    return {r["case_id"]: r["response"] for r in rows}


def evaluate_ocr(cases: list[Case], root: Path, pdf_limits: PageLimits) -> dict[str, Any]:
    """The classical baseline on the same cases and scorer: OCR plus rules (:mod:`medvl.medical.ocr`),
    with its latency and the memory its engine takes. A record case is answered with the
    rules' record (a PDF's pages' records merged), a free-text case with the OCR text."""
    from medvl.medical import ocr

    before = memory.memory_now()
    started = time.perf_counter()
    ocr.load()
    load = {"load_time_s": time.perf_counter() - started, "before_load": before, "after_load": memory.memory_now()}
    rows = []
    for case in tqdm(cases, desc="evaluate ocr", unit="case"):
        pages = [ocr.extract(page) for page in case_pages(root / case.image, pdf_limits)]
        record = merge_pages([page["structured"] for page in pages])[0]
        lines = [line for page in pages for line in page["lines"]]
        rows.append({"case_id": case.case_id, "subset": case.subset, "source": case.source, "record": case.record,
                     "response": json.dumps(record) if case.record else " ".join(lines),
                     "ocr_lines": lines, "latency_s": sum(page["latency_s"] for page in pages),
                     "ocr_s": sum(page["ocr_s"] for page in pages)})
    return {"label": "ocr", "engine": ocr.describe(), "load": load,
            "memory_mb": memory.headline_memory_mb(load["after_load"]) - memory.headline_memory_mb(before),
            "memory_kind": memory.memory_kind(), "cases": rows,
            "latency_s": summarize([r["latency_s"] for r in rows]),
            "scores": scoring.score_answers(cases, answers_of(rows))}


def ocr_grounded_cases(cases: list[Case], ocr_baseline: dict[str, Any]) -> list[Case]:
    """The cases with OCR-grounded prompts (data.ocr_grounded_prompt), from the lines the OCR
    baseline read: suite cases get them here, test rows already have them from phase 5. A PDF
    case keeps its prompt: each of its pages is grounded with its own lines when it is answered
    (:func:`evaluate_model`'s ``ground_pdf_pages``)."""
    lines = {row["case_id"]: row["ocr_lines"] for row in ocr_baseline["cases"]}
    return [case if case.prompt.startswith(OCR_HEADER) or case.image.endswith(".pdf")
            else replace(case, prompt=ocr_grounded(case.prompt, lines[case.case_id]))
            for case in cases]


def decoding_outcomes(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """How the answers ended: record answers (decoded under the schema) by parse status, how many
    were steered to close their JSON as the token budget ran out, how many still hit it; free-text
    answers' parse status apart (their repair and fallback are the only ones left)."""
    records = [r for r in rows if r["record"]]
    free = [r for r in rows if not r["record"]]
    return {"record_answers": len(records),
            "record_parse_status": dict(Counter(r["parse_status"] for r in records)),
            "record_valid_against_schema": sum(is_valid_record(r["response"]) for r in records),
            "record_closed_early": sum(r["closed_early"] for r in records),
            "record_hit_max_tokens": sum(r["finish_reason"] == "length" for r in records),
            "free_text_answers": len(free),
            "free_text_parse_status": dict(Counter(r["parse_status"] for r in free))}


def flagged_items(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Error analysis of plausibility flags: how often each rule fired, with examples."""
    by_rule = Counter(f["rule"] for r in rows for f in r["flags"])
    examples: dict[str, list[str]] = {}
    for r in rows:
        for f in r["flags"]:
            examples.setdefault(f["rule"], [])
            if len(examples[f["rule"]]) < 3:
                examples[f["rule"]].append(f"{r['case_id']}: {f['reason']}")
    return {"cases_with_flags": sum(1 for r in rows if r["flags"]), "by_rule": dict(by_rule),
            "examples": examples, "parse_status": dict(Counter(r["parse_status"] for r in rows))}


# --------------------------------------------------------------------------- baselines


def empty_record_answers(cases: list[Case]) -> dict[str, str]:
    """The floor: the record with every key and nothing in it; an empty free-text answer."""
    empty = json.dumps(empty_structured())
    return {c.case_id: empty if c.record else "" for c in cases}


def most_common_answers(train_rows: list[dict[str, Any]], cases: list[Case]) -> dict[str, str]:
    """The memorising baseline: every record case answered with one record of the training
    answers' most frequent items (as many of each type as a median training record has), every
    free-text case with the training answers' most frequent words. A model that does not beat
    it has learnt the distribution, not to read."""
    records, texts = [], []
    for row in train_rows:
        answer = row["messages"][1]["content"][0]["text"]
        (records if row["source"] == "synthetic" else texts).append(answer)
    return {c.case_id: (_most_common_record([json.loads(a) for a in records]) if c.record
                        else _most_common_text(texts)) for c in cases}


def _most_common_record(records: list[dict[str, Any]]) -> str:
    out = empty_structured()
    middle = len(records) // 2
    for key in ("medications", "diagnoses", "procedures", "lab_values"):
        counts = Counter(json.dumps(item, sort_keys=True) for r in records for item in r[key])
        typical = sorted(len(r[key]) for r in records)[middle] if records else 0
        out[key] = [json.loads(item) for item, _ in counts.most_common(typical)]
    typical = sorted(len(r["vitals"]) for r in records)[middle] if records else 0
    for name, _ in Counter(k for r in records for k in r["vitals"]).most_common(typical):
        out["vitals"][name] = Counter(r["vitals"][name] for r in records if name in r["vitals"]).most_common(1)[0][0]
    return record_answer(out)


def _most_common_text(texts: list[str], words: int = 30) -> str:
    counts = Counter(w for t in texts for w in re.findall(r"[\w'-]+", t.lower()))
    return " ".join(w for w, _ in counts.most_common(words))


def score_baseline(name: str, answers: dict[str, str], cases: list[Case]) -> dict[str, Any]:
    """A fixed-answer baseline scored like a model; its answers kept for the record."""
    return {"label": name, "answers": sorted(set(answers.values())),  # one per kind: record, free text
            "scores": scoring.score_answers(cases, answers)}


def score_standard_bench(record: dict[str, Any], truth_folder: Path) -> dict[str, Any]:
    """Extraction scores of a phase-3/4/7 harness record on the five standard documents."""
    cases = []
    for row in record.get("samples", []):
        truth = json.loads((truth_folder / f"{row['doc_id']}.json").read_text())
        cases.append(Case(row["doc_id"], "standard", "synthetic", f"{row['doc_id']}.png", "", truth["structured"]))
    answers = {row["doc_id"]: row["response"] for row in record.get("samples", [])}
    return scoring.score_answers(cases, answers)["subsets"]["standard"]["extraction"]
