#!/usr/bin/env python3
"""Phase 5: build the training data.

Tries the three hub sources (ROCO radiology, PubMedVision alignment VQA, MTSamples; each
limited and streamed) and always adds synthetic medical documents with structured JSON
answers; with no hub reachable, the synthetic corpus is the whole set (labelled as such).
Discards unreadable images and short texts, de-duplicates, keeps every phase-3 test and
phase-7 evaluation document out, drops (counts, never cuts) samples longer than
train.max_length with the phase-2 model's processor and fails when more than
data.max_too_long_fraction would be dropped, shuffles with the split seed into 80/10/10 splits,
asks every record page of the test split what /extract asks (so phase 7 scores, and phase 8
compares with the server, the product's own request), with data.ocr_grounded_prompt puts each
page's OCR text before its instruction (medvl/medical/ocr.py, over every core; each page's lines
kept in datasets/ocr_cache/, so a rerun reads only pages it has not read), and writes the
splits as Qwen2.5-VL conversations to datasets/formatted/, plus download_summary.json and
data_summary.json. Synthetic pages are rendered over every core. With data.reviewed_records (an
export of the API's review store) the reviewed pages join the training split only, never a
validation, test or evaluation page and never a page already there.
"""

import random
from collections import Counter
from pathlib import Path

from medvl.core.io import append_build_log, atomic_dir, atomic_write_json
from medvl.core.settings import Settings
from medvl.core.workdir import Workdir
from medvl.medical import ocr
from medvl.medical.ocr import OcrUnavailable
from medvl.model.loading import load_processor
from medvl.pipeline.gates import PHASES
from medvl.pipeline.runner import PhaseError, log, run_phase
from medvl.training import data

PHASE = PHASES[5]


def reviewed_for_training(settings: Settings, wd: Workdir, splits: dict, reports: dict,
                          dropped: Counter) -> tuple[list, dict]:
    """The pages of data.reviewed_records that may train (data.admit_reviewed), counted as the
    "reviewed" source of download_summary.json, and how many documents (corrected ones apart)."""
    path = Path(settings.data.reviewed_records)
    if not path.is_file():
        raise PhaseError(f"data.reviewed_records: no file {str(path)!r} (save GET /review/export of the API there)")
    report = reports.setdefault("reviewed", data.SourceReport("reviewed"))
    samples, statuses = data.reviewed_samples(path, random.Random(settings.data.split_seed), report)
    admitted = data.admit_reviewed(samples, splits, data.protected_pixels(wd.test_images), dropped)
    report.kept = len(admitted)
    documents = {s.group for s in admitted}
    counts = {"pages": len(admitted), "documents": len(documents),
              "corrected_documents": sum(statuses[d] == "corrected" for d in documents), "export": str(path)}
    log.info("reviewed pages: %d read, %d admitted to training (%d documents, %d corrected)", report.rows_read,
             len(admitted), counts["documents"], counts["corrected_documents"])
    return admitted, counts


def main(settings: Settings, wd: Workdir) -> dict:
    record = settings.record(PHASE.sections)
    samples, reports = data.collect_samples(settings, wd.datasets / "raw")
    hub_ok = data.hub_sources_ok(reports)
    offline = not hub_ok

    # ---- filter, split, ask the test split what /extract asks, ground, measure, write (into a
    # fresh folder swapped in whole)
    dropped: Counter = Counter()
    kept = data.deduplicate(samples, data.protected_hashes(settings), dropped)
    splits = data.split(kept, settings.data.split_seed, settings.data.val_fraction, settings.data.test_fraction)
    splits["test"] = data.as_served(splits["test"])
    reviewed = None
    if settings.data.reviewed_records:  # reviewed pages train only, after the split
        admitted, reviewed = reviewed_for_training(settings, wd, splits, reports, dropped)
        splits["train"] += admitted
    processor = load_processor(wd.base_model_dir(settings), settings)
    if settings.data.ocr_grounded_prompt:
        ocr.use_backend(settings.api.ocr_backend)  # training pages read as the server reads pages
        try:
            splits = data.per_split(lambda rows: data.ground_prompts(rows, wd.datasets / "ocr_cache"), splits)
        except OcrUnavailable as exc:
            raise PhaseError(f"data.ocr_grounded_prompt is on but OCR cannot run: {exc}") from None
    lengths: dict = {}

    def fitting(rows: list[data.Sample]) -> list[data.Sample]:
        kept, report = data.drop_too_long(rows, processor, settings.train.max_length)
        lengths.update(report)
        return kept

    splits = data.per_split(fitting, splits)
    if lengths["too_long_fraction"] > settings.data.max_too_long_fraction:
        raise PhaseError(
            f"{lengths['too_long']} of {lengths['samples_checked']} samples ({lengths['too_long_by_source']}) "
            f"exceed train.max_length={settings.train.max_length} tokens (e.g. {lengths['too_long_examples'][:2]}), "
            f"more than data.max_too_long_fraction={settings.data.max_too_long_fraction}: raise train.max_length, "
            "lower model.max_pixels or data.mtsamples_page_chars")

    fallback_note = ("no hub source reachable: the training set is entirely synthetic medical documents "
                     "generated offline by medvl.medical.documents" if offline else None)
    download = {**record, "hub_sources_ok": hub_ok, "offline_fallback": offline,
                "fallback_note": fallback_note,
                "sources": {name: r.to_dict() for name, r in reports.items()}}
    summary = {**record, "offline_fallback": offline, "fallback_note": fallback_note,
               "discarded": {"filtering": {n: dict(r.discarded) for n, r in reports.items()},
                             "deduplication": dict(dropped)},
               "length_check": lengths, "reviewed": reviewed}
    with atomic_dir(wd.datasets / "formatted") as staging:
        summary.update(data.summarize_splits(data.write_splits(splits, staging)))
        atomic_write_json(staging / "data_summary.json", summary)
    atomic_write_json(PHASE.output(wd, "download_summary.json"), download)

    counts = summary["counts"]
    log.info("splits: train %d, val %d, test %d (%s)", counts["train"], counts["val"], counts["test"],
             "SYNTHETIC ONLY: no hub source reachable" if offline else f"hub sources: {', '.join(hub_ok)}")
    append_build_log(wd.build_log, PHASE.number, "datasets", [
        *(f"{name}: {r.status}" + (f" from {r.repo}" if r.repo else "") +
          (f"; failed attempts: {'; '.join(a['repo'] + ' -> ' + a['error'] for a in r.attempts)}" if r.attempts else "")
          for name, r in reports.items()),
        f"Fallback: {fallback_note}." if offline else f"Hub sources used: {', '.join(hub_ok)}.",
        f"Splits (seed {settings.data.split_seed}): train {counts['train']}, val {counts['val']}, "
        f"test {counts['test']}; discarded {dict(dropped) or 'none'} after filtering.",
        f"Length check at train.max_length={lengths['max_length']}: {lengths['too_long']} of "
        f"{lengths['samples_checked']} samples too long, dropped ({lengths['too_long_by_source'] or 'none'}); "
        f"tokens per sample p50 {lengths['tokens']['p50']:.0f}, max {lengths['tokens']['max']:.0f}.",
    ])
    return summary


if __name__ == "__main__":
    run_phase(PHASE.number, main, __doc__)
