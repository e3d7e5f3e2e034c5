"""Command-line inference on the same engine as the API.

    python -m medvl.cli.infer --image scan.png                    # one document, structured JSON
    python -m medvl.cli.infer --image discharge.pdf               # a PDF: every page, one record
    python -m medvl.cli.infer --dir datasets/test_images --out results.jsonl   # its images and PDFs
    python -m medvl.cli.infer --dir "scans/*.jpg"                 # a glob works too
    python -m medvl.cli.infer --interactive                       # image paths and prompts until EOF
    python -m medvl.cli.infer --image scan.png --prompt "List the medications."   # free text
    python -m medvl.cli.infer --image scan.png --format fhir      # the record as a FHIR Bundle

--model is a model folder (merged, base, AWQ or NF4), a LoRA adapter folder (loaded on its
base), one of the keywords best (default: fine-tuned if phase 7 ran, else base), base,
finetuned, or ocr: the classical OCR + rules baseline phase 7 scores beside the models, to
compare on your own documents (records only, no --prompt); --weights picks the form as the server's flag does (default: the profile's form,
the one phase 7 evaluated), so the CLI answers with the model the API serves.
A PDF is rendered page by page (api.max_pdf_pages, api.pdf_render_dpi), its pages answered
together and merged into one record whose items say their page, as /extract does. As there,
each item has its confidence and its fields' boxes on the page (the page's OCR, seconds a page
on a CPU; --set api.source_boxes=false leaves them out), and needs_review lists the items to
check by hand (api.review_below_confidence).
Batch mode writes one JSON line per file, continues past unreadable files, lists them at
the end and exits with status 1 if there were any. Every structured result carries
plausibility flags; they are informational, not clinical advice.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import mimetypes
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from PIL import Image
from tqdm import tqdm

from medvl.core.settings import DEFAULT_PROFILE, SERVED_SETTINGS, ApiSettings, SettingsError, load_settings
from medvl.core.workdir import Workdir
from medvl.engine.grammar import RECORD_FORMAT
from medvl.engine.images import BadInput
from medvl.engine.loader import ServedModel, open_served
from medvl.engine.pages import PAGE_BREAK, PageLimits, decode_pages, headed_page_texts
from medvl.engine.scheduler import PromptTooLong, SamplingParams
from medvl.engine.tokens import record_page
from medvl.medical import ocr
from medvl.medical.confidence import document_confidences
from medvl.medical.fhir import record_bundle
from medvl.medical.prompts import EXTRACTION_PROMPT
from medvl.medical.records import document_result
from medvl.medical.sources import item_boxes, normalised, source_runs
from medvl.model.forms import FORMS, FormError

DOCUMENT_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".pdf"}


def collect_files(target: str) -> list[Path]:
    """A folder (its images and PDFs, sorted) or a glob pattern."""
    path = Path(target)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in DOCUMENT_SUFFIXES)
    return sorted(Path(p) for p in glob.glob(target))


# One answer per page: a record result (as medvl.medical.records.structured_result gives it) or
# {"text": ...} for a prompt, with the page's generated_tokens.
Answer = Callable[[list[Image.Image], "str | None", int], list[dict[str, Any]]]


@dataclass
class Job:
    """What every document of one run gets: who answers, the prompt, the answer length, and the
    upload limits the server applies (api.max_upload_mb, api.max_image_pixels, api.max_pdf_pages,
    api.pdf_render_dpi)."""

    answer: Answer
    prompt: str | None
    max_new_tokens: int
    limits: ApiSettings
    # "fhir": each record as a FHIR Bundle naming this model (path, served form, settings hash)
    output: str = "record"
    model: dict[str, str] | None = None


def model_answer(served: ServedModel) -> Answer:
    """Answers from the served model: the record under its schema, or free text for a prompt
    (OCR-grounded as the server grounds it when the profile says so); a document's pages are
    submitted together and decode side by side."""
    engine = served.engine

    def answer(pages: list[Image.Image], prompt: str | None, max_new_tokens: int) -> list[dict[str, Any]]:
        params = (SamplingParams(max_new_tokens) if prompt
                  else SamplingParams(max_new_tokens, response_format=RECORD_FORMAT, logprobs=0))
        prompts = [engine.prepare(page, served.prompt_for(page, prompt or EXTRACTION_PROMPT)) for page in pages]
        answers = []
        for result in engine.generate_many(prompts, [params] * len(prompts)):
            if prompt:
                answers.append({"text": result.text, "generated_tokens": result.generated_tokens})
            else:  # decoded under the record's schema, with its fields' confidences, as /extract does
                answers.append({**record_page(result, engine.processor.tokenizer), "raw_text": result.text,
                                "closed_early": result.closed_early, "generated_tokens": result.generated_tokens})
        return answers
    return answer


def ocr_answer(pages: list[Image.Image], prompt: str | None, max_new_tokens: int) -> list[dict[str, Any]]:
    """The classical baseline (--model ocr): OCR + rules, the record with the same flags."""
    if prompt:
        raise BadInput("the OCR baseline only extracts records: --prompt needs a model")
    return [{**ocr.structured_result(page), "closed_early": False, "generated_tokens": 0} for page in pages]


def run_one(job: Job, path: Path, prompt: str | None) -> dict[str, Any]:
    """Read, check and answer one document (an image, or a PDF page by page, merged as /extract
    merges it); raises BadInput/OSError/PromptTooLong for unusable files."""
    data = path.read_bytes()
    started = time.perf_counter()
    pages = decode_pages(data, PageLimits.from_settings(job.limits))
    answers = job.answer(pages, prompt, job.max_new_tokens)
    timing = {"latency_s": round(time.perf_counter() - started, 4),
              "generated_tokens": sum(answer["generated_tokens"] for answer in answers)}
    if prompt:
        return {"file": str(path), "text": headed_page_texts([a["text"] for a in answers]),
                "pages": [{"page": n, "text": a["text"]} for n, a in enumerate(answers, 1)], **timing}
    document = document_confidences(document_result(answers), answers, job.limits.review_below_confidence)
    if job.limits.source_boxes:  # the OCR baseline's own runs, else the pages read now
        runs = ([normalised(a["runs"], a["page_size"]) for a in answers] if all("runs" in a for a in answers)
                else source_runs(pages))
        if runs is not None:
            item_boxes(document, runs)
    if job.output == "fhir":
        bundle = record_bundle(document["structured"], hashlib.sha256(data).hexdigest(),
                               mimetypes.guess_type(path.name)[0] or "application/octet-stream", len(data),
                               job.model or {})
        return bundle.model_dump(mode="json", exclude_none=True)
    return {"file": str(path), **document, **timing,
            "pages": [{"page": n, "parse_status": a["parse_status"], "closed_early": a["closed_early"],
                       "generated_tokens": a["generated_tokens"]} for n, a in enumerate(answers, 1)],
            "raw_text": PAGE_BREAK.join(a["raw_text"] for a in answers),
            "closed_early": any(a["closed_early"] for a in answers)}


def batch(job: Job, files: list[Path], out: TextIO) -> int:
    failures: list[tuple[Path, str]] = []
    for path in tqdm(files, desc="documents", unit="doc", file=sys.stderr):
        try:
            record = run_one(job, path, job.prompt)
        except (BadInput, OSError, PromptTooLong) as exc:
            failures.append((path, str(exc)))
            continue
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
    done = len(files) - len(failures)
    print(f"{done} of {len(files)} documents processed", file=sys.stderr)
    for path, reason in failures:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    return 1 if failures else 0


def interactive(job: Job, stdin: TextIO, out: TextIO) -> int:
    """Ask for a document's path (an image or a PDF), then a prompt (empty = structured extraction), until EOF."""
    while True:
        print("document path (Ctrl-D to quit)> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        path = Path(line.strip()).expanduser()
        print("prompt (empty = structured extraction)> ", end="", file=sys.stderr, flush=True)
        prompt = stdin.readline().strip() or None
        try:
            record = run_one(job, path, prompt)
        except (BadInput, OSError, PromptTooLong) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            continue
        out.write(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medvl.cli.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--image", help="one document: an image or a PDF")
    mode.add_argument("--dir", help="a folder of images and PDFs, or a glob pattern (batch, JSON lines)")
    mode.add_argument("--interactive", action="store_true", help="ask for images and prompts until EOF")
    parser.add_argument("--prompt", help="free-text question instead of structured extraction")
    parser.add_argument("--model", default="best",
                        help="model or adapter folder, best/base/finetuned, or ocr (the OCR + rules baseline)")
    parser.add_argument("--weights", default="auto", choices=("auto", *FORMS),
                        help="the served form (default: auto, the profile's; a folder's own form)")
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a profile setting, as the pipeline and the server take them (repeatable)")
    parser.add_argument("--workdir", default=None, help="where the pipeline wrote models/ (default: repo root)")
    parser.add_argument("--out", help="batch output file (default: stdout)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length (default: api.max_new_tokens)")
    parser.add_argument("--format", choices=("record", "fhir"), default="record",
                        help="record: the project's record with flags; fhir: a FHIR R4B Bundle per document "
                             "(Observations, MedicationStatements, Conditions, ...; medvl/medical/fhir.py)")
    args = parser.parse_args(argv)
    if args.format == "fhir" and args.prompt:
        parser.error("--format fhir writes extracted records; it cannot answer a free-text --prompt")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        settings = load_settings(args.profile, args.set)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # as many cache slots as a PDF may have pages (at most the engine's batch): its pages decode together
        slots = min(settings.api.max_pdf_pages, settings.decode.max_batch_size)
        served, _ = open_served(settings, Workdir.at(args.workdir), args.model, args.weights, slots=slots)
    except FormError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        served.load()  # the engine's loop then runs in this thread, one document at a time
    except ocr.OcrUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: the model failed to load: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    answer = ocr_answer if served.engine is None else model_answer(served)
    try:
        model = {"model_path": str(served.model_dir), "served_form": served.form,
                 "settings_hash": settings.fingerprint(SERVED_SETTINGS)}
        return answer_all(Job(answer, args.prompt, args.max_new_tokens or settings.api.max_new_tokens, settings.api,
                              args.format, model), args)
    finally:
        served.stop()


def answer_all(job: Job, args: argparse.Namespace) -> int:
    """One image, a batch, or interactive, per the arguments; returns the exit status."""
    if args.image:
        try:
            record = run_one(job, Path(args.image), job.prompt)
        except (BadInput, OSError, PromptTooLong) as exc:
            print(f"error: {args.image}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(record, ensure_ascii=False, indent=2))
        return 0
    if args.interactive:
        return interactive(job, sys.stdin, sys.stdout)
    files = collect_files(args.dir)
    if not files:
        print(f"error: no images or PDFs match {args.dir}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            return batch(job, files, out)
    return batch(job, files, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
