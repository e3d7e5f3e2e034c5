"""The medvl routes: /extract, /analyze, /health, /benchmark, /metrics (chat: medvl/http/openai_chat.py;
the reviewer's: medvl/http/review.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from medvl.core.settings import SERVED_SETTINGS
from medvl.engine.grammar import RECORD_FORMAT
from medvl.engine.pages import PAGE_BREAK, headed_page_texts
from medvl.engine.scheduler import SamplingParams
from medvl.engine.tokens import record_page
from medvl.http.audit import RequestAudit
from medvl.http.errors import ERROR_RESPONSES
from medvl.http.review import file_for_review, store_of
from medvl.http.schemas import AnalyzeResponse, ExtractResponse, HealthResponse, PageAnswer, PageText, Usage
from medvl.http.state import ServerState, State, check_prompt, sum_usage, usage
from medvl.medical.confidence import document_confidences
from medvl.medical.fhir import record_bundle
from medvl.medical.prompts import EXTRACTION_PROMPT
from medvl.medical.records import document_result
from medvl.medical.sources import item_boxes, normalised, source_runs

router = APIRouter()
log = logging.getLogger("medvl.api")


async def read_upload(state: ServerState, file: UploadFile) -> bytes:
    """The upload's bytes (held in memory: medvl/http/uploads.py); decoded later, off the event loop."""
    return await file.read(state.max_bytes + 1)


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(state: State):
    """200 once the model serves; 503 (with Retry-After) while it loads, after it failed to load,
    and after the engine died (the process then exits for its supervisor to restart it)."""
    import torch

    served = state.served
    ready = served.ready.is_set()
    engine = served.engine if ready else None
    dead = engine.dead if engine is not None else None
    status = "error" if served.error else "dead" if dead else ("ok" if ready else "loading")
    body = HealthResponse(
        status=status, model_loaded=ready, model_path=str(served.model_dir), weights=served.form,
        device=served.device,
        gpu_name=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        gpu_memory_used_mb=torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        gpu_memory_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        requests_running=engine.num_running if engine else 0, requests_waiting=engine.num_waiting if engine else 0,
        decoding=served.decoding, startup_s=served.startup_s, error=served.error or (str(dead) if dead else None),
        settings_hash=state.settings.fingerprint(SERVED_SETTINGS))
    return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503,
                        headers=None if status == "ok" else {"Retry-After": "5"})


DOCUMENT_FILE = File(description="a document: an image (PNG, JPEG, ...) or a PDF (each page read; api.max_pdf_pages)")


@router.post("/extract", response_model=ExtractResponse, responses={
    **ERROR_RESPONSES, 200: {"content": {"application/fhir+json": {}},
                             "description": "the record (format=record) or a FHIR R4B Bundle (format=fhir)"}})
async def extract(http: Request, state: State, file: Annotated[UploadFile, DOCUMENT_FILE],
                  format: Annotated[Literal["record", "fhir"], Query(
                      description="record: the project's record; fhir: a FHIR Bundle (medvl/medical/fhir.py)")] = "record",
                  review: Annotated[bool, Query(
                      description="file the result for review (GET /review/{review_id}); needs a server with "
                                  "api.review_store (every result is filed with api.file_for_review)")] = False):
    """Structured medical record from a document (an image, or a PDF read page by page and
    merged, each item with its page), decoded under the record's JSON schema (or read by OCR +
    rules on a server started with ``--model ocr``); as a FHIR Bundle with ``?format=fhir``;
    filed for a reviewer with ``?review=true``."""
    state.check_ready()
    filing = review or state.settings.api.file_for_review
    if filing:
        store_of(state)  # a 404 before any work when the server keeps no review store
    data = await read_upload(state, file)
    audit = http.state.audit
    audit.document(data)
    if state.served.engine is None:
        response, images = await ocr_extract(state, data, audit)
    else:
        prompts, images = await state.prepare_pages(data, EXTRACTION_PROMPT)
        audit.pages = len(prompts)
        # The pages' OCR (for the source boxes) runs in a thread while the model decodes.
        runs = (asyncio.ensure_future(state.in_ocr_thread(lambda: source_runs(images)))
                if state.settings.api.source_boxes else None)
        params = [SamplingParams(state.answer_tokens(p), response_format=RECORD_FORMAT, logprobs=0) for p in prompts]
        try:
            results = await state.generate_pages(prompts, params, http)
        finally:
            runs_by_page = await runs if runs is not None else None
        tokenizer = state.engine().processor.tokenizer
        pages = [record_page(result, tokenizer) for result in results]
        answers = [PageAnswer(page=number, parse_status=page["parse_status"], closed_early=result.closed_early,
                              usage=usage(result))
                   for number, (page, result) in enumerate(zip(pages, results, strict=True), 1)]
        document = reviewed(document_result(pages), pages, state)
        if runs_by_page is not None:
            item_boxes(document, runs_by_page)
        response = ExtractResponse(
            request_id=audit.request_id, **document, pages=answers,
            raw_text=PAGE_BREAK.join(result.text for result in results),
            closed_early=any(result.closed_early for result in results),
            latency_s=max(result.latency_s for result in results), usage=sum_usage(results), model=state.model_info())
    if filing:
        response.review_id = await file_for_review(state, http, response, images,
                                                   file.content_type or "application/octet-stream")
    if format == "record":
        return response
    bundle = record_bundle(response.structured.model_dump(), audit.document_sha256,
                           file.content_type or "application/octet-stream", len(data), state.audit_model())
    # a Bundle has no place for the review id: it goes in a header
    return Response(bundle.model_dump_json(), media_type="application/fhir+json",
                    headers={"X-Review-ID": response.review_id} if response.review_id else None)


def reviewed(document: dict[str, Any], pages: list[dict[str, Any]], state: ServerState) -> dict[str, Any]:
    """The document with each item's confidence and the items to review (under
    ``api.review_below_confidence``, or without a confidence, as every OCR-baseline item is)."""
    return document_confidences(document, pages, state.settings.api.review_below_confidence)


async def ocr_extract(state: ServerState, data: bytes, audit: RequestAudit) -> tuple[ExtractResponse, list[Any]]:
    """/extract from the OCR + rules baseline: the record its rules read, with the same flags,
    and the page images it was read from."""
    pages, images = await state.ocr_extract(data)
    audit.pages = len(pages)
    none = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    document = reviewed(document_result(pages), pages, state)
    if state.settings.api.source_boxes:  # the baseline's own OCR runs
        item_boxes(document, [normalised(page["runs"], page["page_size"]) for page in pages])
    response = ExtractResponse(request_id=audit.request_id, **document,
                               pages=[PageAnswer(page=number, parse_status="ocr", closed_early=False, usage=none)
                                      for number in range(1, len(pages) + 1)],
                               raw_text=PAGE_BREAK.join(page["raw_text"] for page in pages),
                               latency_s=sum(page["latency_s"] for page in pages), usage=none,
                               model=state.model_info())
    return response, images


@router.post("/analyze", response_model=AnalyzeResponse, responses=ERROR_RESPONSES)
async def analyze(http: Request, state: State, file: Annotated[UploadFile, DOCUMENT_FILE],
                  prompt: Annotated[str, Form()] = "Describe this medical document."):
    """Free-text answer to a prompt about a document; a PDF's pages are each asked it (the
    context holds one page) and answered under "Page N:" headings."""
    state.engine()
    prompt = check_prompt(prompt)
    data = await read_upload(state, file)
    audit = http.state.audit
    audit.document(data)
    prompts, _ = await state.prepare_pages(data, prompt)
    audit.pages = len(prompts)
    results = await state.generate_pages(prompts, [SamplingParams(state.answer_tokens(p)) for p in prompts], http)
    texts = [result.text for result in results]
    return AnalyzeResponse(request_id=audit.request_id, text=headed_page_texts(texts),
                           pages=[PageText(page=n, text=t) for n, t in enumerate(texts, 1)],
                           latency_s=max(result.latency_s for result in results), usage=sum_usage(results),
                           model=state.model_info())


@router.get("/benchmark")
async def benchmark_files(state: State):
    """Every benchmark JSON of the run, by name (settings blocks left out)."""
    out: dict[str, Any] = {}
    for path in sorted(state.workdir.benchmarks.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict):
            data.pop("settings", None)
        out[path.stem] = data
    return out


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(state: State):
    text = state.metrics.render(state.served.engine if state.served.ready.is_set() else None)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
