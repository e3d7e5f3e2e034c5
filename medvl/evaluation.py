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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from medvl import benchmark, lexicon, scoring
from medvl.documents import generate_document, save_document
from medvl.evalsuite import evaluation_documents
from medvl.io import atomic_dir
from medvl.prompts import EXTRACTION_PROMPT, OCR_HEADER, ocr_grounded
from medvl.records import RECORD_FORMAT, is_valid_record, structured_result

log = logging.getLogger(__name__)


@dataclass
class Case:
    case_id: str
    subset: str  # "suite" (hand-written) or "test" (phase-5 test split)
    image_path: Path
    prompt: str
    expected: scoring.Expected
    record: bool  # the answer is an extraction record: decoded under its schema; else free text
    reference: str = ""  # the reference answer a free-text answer is scored against (ROUGE-L)


def suite_cases(folder: Path) -> list[Case]:
    """Render the hand-written suite to PNG (with ground truth JSON) and wrap it as cases."""
    cases = []
    for doc in evaluation_documents():
        image, _ = save_document(doc, folder)
        cases.append(Case(doc.doc_id, "suite", image, EXTRACTION_PROMPT, scoring.Expected.from_document(doc), True))
    return cases


def test_split_cases(formatted: Path, limit: int) -> list[Case]:
    """Phase-5 test rows: synthetic ones scored against their regenerated record."""
    rows = json.loads((formatted / "test.json").read_text())
    if limit:
        rows = rows[:limit]
    cases = []
    for row in rows:
        prompt = row["messages"][0]["content"][1]["text"]
        reference = row["messages"][1]["content"][0]["text"]
        match = re.fullmatch(r"syn-(\w+)-(\d+)", row["id"])
        if row["source"] == "synthetic" and match:
            expected = scoring.Expected.from_document(_regenerated(row["id"], int(match.group(2)), reference))
        else:
            expected = scoring.Expected.from_reference(reference)
        cases.append(Case(row["id"], "test", formatted / row["image"], prompt, expected, row["source"] == "synthetic",
                          reference))
    return cases


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
    benchmark.free_memory()
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


def _regenerated(sample_id: str, seed: int, reference: str) -> Any:
    """The synthetic document a test row was made from, checked against the row's answer.

    It must be drawn exactly as phase 5 drew it (the kind from the seed too: naming the kind
    skips that draw and yields another document, which is how test rows were once scored
    against the wrong ground truth)."""
    doc = generate_document(seed, prefix="syn")
    if doc.doc_id != sample_id or doc.target_answer() != reference:
        raise ValueError(f"test row {sample_id} does not match its regenerated document {doc.doc_id}: "
                         "the generator changed since phase 5 ran; rerun phase 5")
    return doc


def evaluate_model(label: str, loader: Callable[[], Any], processor: Any, cases: list[Case],
                   max_new_tokens: int, decode: Any) -> dict[str, Any]:
    """Generate an answer per case (through the serving engine, per ``decode``), score it,
    and time it with the shared harness."""
    model, load = benchmark.timed_load(loader)
    first = benchmark.BenchSample(cases[0].case_id, cases[0].image_path, cases[0].prompt)
    engine, warm_up_s = benchmark.make_engine(model, processor, decode, first)
    rows = []
    images: dict[Path, Image.Image] = {}
    for case in tqdm(cases, desc=f"evaluate {label}", unit="case"):
        if case.image_path not in images:
            images[case.image_path] = Image.open(case.image_path).convert("RGB")
        out = benchmark.generate_timed(engine, images[case.image_path], case.prompt, max_new_tokens,
                                       RECORD_FORMAT if case.record else None)
        result = scoring.score(out["response"], case.expected)
        extracted = structured_result(out["response"])
        rows.append({"case_id": case.case_id, "subset": case.subset, "prompt": case.prompt, "record": case.record,
                     "response": out["response"], "generated_tokens": out["generated_tokens"],
                     "finish_reason": out["finish_reason"], "closed_early": out["closed_early"],
                     "latency_s": out["latency_s"], "ttft_s": out["ttft_s"], **result.to_dict(),
                     "rouge_l": None if case.record else scoring.rouge_l(out["response"], case.reference),
                     "parse_status": extracted["parse_status"], "flags": extracted["flags"]})
    peak = benchmark.peak_memory_mb()
    benchmark.unload(model)
    return {
        "label": label,
        "load": load,
        "decoder_warm_up_s": warm_up_s,
        "peak_memory_mb": peak,
        "memory_kind": benchmark.memory_kind(),
        "cases": rows,
        "latency_s": benchmark.summarize([r["latency_s"] for r in rows]),
        "ttft_s": benchmark.summarize([r["ttft_s"] for r in rows]),
        "scores": scores_by_subset(rows),
        "flagged_items": flagged_items(rows),
        "decoding": decoding_outcomes(rows),
        "free_text": free_text_scores(rows),
    }


def free_text_scores(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """ROUGE-L of the free-text answers (captions, question answers) per subset: their terms
    and values are scored with the rest, but a caption's quality is its overlap with the reference."""
    free = [r for r in rows if r["rouge_l"] is not None]
    by_subset = {subset: [r["rouge_l"] for r in free if r["subset"] == subset] for subset in sorted({r["subset"] for r in free})}
    return {"answers": len(free),
            "rouge_l": {subset: {"mean": sum(v) / len(v), "n": len(v)} for subset, v in by_subset.items()}}


def evaluate_ocr(cases: list[Case]) -> dict[str, Any]:
    """The classical baseline on the same cases and scorer: OCR plus rules (:mod:`medvl.ocr`),
    with its latency and the memory its engine takes."""
    from medvl import ocr

    before = benchmark.memory_now()
    started = time.perf_counter()
    ocr.load()
    load = {"load_time_s": time.perf_counter() - started, "before_load": before, "after_load": benchmark.memory_now()}
    rows = []
    for case in tqdm(cases, desc="evaluate ocr", unit="case"):
        with Image.open(case.image_path) as image:
            out = ocr.extract(image)
        rows.append({"case_id": case.case_id, "subset": case.subset, "record": case.record,
                     "response": out["response"], "ocr_lines": out["lines"], "latency_s": out["latency_s"],
                     "ocr_s": out["ocr_s"],
                     **scoring.score(out["response"], case.expected).to_dict(),
                     "rouge_l": None if case.record else scoring.rouge_l(" ".join(out["lines"]), case.reference)})
    return {"label": "ocr", "engine": ocr.describe(), "load": load,
            "memory_mb": benchmark.headline_memory_mb(load["after_load"]) - benchmark.headline_memory_mb(before),
            "memory_kind": benchmark.memory_kind(), "cases": rows,
            "latency_s": benchmark.summarize([r["latency_s"] for r in rows]),
            "scores": scores_by_subset(rows),
            "free_text": free_text_scores(rows)}


def ocr_grounded_cases(cases: list[Case], ocr_baseline: dict[str, Any]) -> list[Case]:
    """The cases with OCR-grounded prompts (data.ocr_grounded_prompt), from the lines the OCR
    baseline read: suite cases get them here, test rows already have them from phase 5."""
    lines = {(row["subset"], row["case_id"]): row["ocr_lines"] for row in ocr_baseline["cases"]}
    return [case if case.prompt.startswith(OCR_HEADER)
            else replace(case, prompt=ocr_grounded(case.prompt, lines[case.subset, case.case_id]))
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


def scores_by_subset(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {subset: aggregate_rows([r for r in rows if r["subset"] == subset])
            for subset in sorted({r["subset"] for r in rows})}


def aggregate_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("term_recall", "value_recall", "accuracy", "precision", "f1", "missed", "hallucinated",
            "category_recall")
    return scoring.aggregate([scoring.Score(**{k: r[k] for k in keys}) for r in rows])


def most_common_answer(train_rows: list[dict[str, Any]], top: int = 12) -> str:
    """The trivial baseline: always answer the terms and values most frequent in training."""
    counts: Counter = Counter()
    for row in train_rows:
        answer = row["messages"][1]["content"][0]["text"]
        norm = scoring.normalize(answer)
        counts.update(w for w in lexicon.terms() if scoring.contains(norm, w))
        counts.update(re.findall(r"\b\d+(?:\.\d+)? (?:mg|mcg|units|g)\b", norm))
        counts.update(re.findall(r"\b(?:BID|TID|QD|QHS|PRN|q\d+h)\b", answer))
    return " ".join(item for item, _ in counts.most_common(top))


def score_fixed_answer(answer: str, cases: list[Case]) -> dict[str, Any]:
    results = [scoring.score(answer, case.expected) for case in cases]
    by_subset: dict[str, list[scoring.Score]] = {}
    for case, result in zip(cases, results, strict=True):
        by_subset.setdefault(case.subset, []).append(result)
    rows = [{"subset": case.subset, "rouge_l": None if case.record else scoring.rouge_l(answer, case.reference)}
            for case in cases]
    return {"answer": answer, "scores": {s: scoring.aggregate(v) for s, v in sorted(by_subset.items())},
            "free_text": free_text_scores(rows)}


def score_standard_bench(record: dict[str, Any], truth_folder: Path) -> dict[str, Any]:
    """Accuracy of a phase-3/4/7 harness record on the five standard documents."""
    results = []
    for row in record.get("samples", []):
        truth = json.loads((truth_folder / f"{row['doc_id']}.json").read_text())
        doc = truth["document"]
        expected = scoring.Expected.from_document(_document_from_dict(doc))
        results.append(scoring.score(row["response"], expected))
    return scoring.aggregate(results)


def _document_from_dict(data: dict[str, Any]):
    from medvl.documents import MedicalDocument

    return MedicalDocument(**data)
