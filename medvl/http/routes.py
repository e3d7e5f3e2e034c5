"""The medvl routes: /extract, /analyze, /health, /benchmark, /metrics (chat: medvl/http/openai_chat.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from medvl.core.settings import SERVED_SETTINGS
from medvl.engine.grammar import RECORD_FORMAT
from medvl.engine.scheduler import SamplingParams
from medvl.http.errors import ERROR_RESPONSES
from medvl.http.schemas import AnalyzeResponse, ExtractResponse, HealthResponse, Usage
from medvl.http.state import ServerState, State, check_prompt, usage
from medvl.medical.fhir import record_bundle
from medvl.medical.prompts import EXTRACTION_PROMPT
from medvl.medical.records import structured_result

router = APIRouter()


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


@router.post("/extract", response_model=ExtractResponse, responses={
    **ERROR_RESPONSES, 200: {"content": {"application/fhir+json": {}},
                             "description": "the record (format=record) or a FHIR R4B Bundle (format=fhir)"}})
async def extract(http: Request, state: State,
                  file: Annotated[UploadFile, File(description="a document image (PNG, JPEG, ...)")],
                  format: Annotated[Literal["record", "fhir"], Query(
                      description="record: the project's record; fhir: a FHIR Bundle (medvl/medical/fhir.py)")] = "record"):
    """Structured medical record from a document image, decoded under the record's JSON schema
    (or read by OCR + rules on a server started with ``--model ocr``); as a FHIR Bundle with
    ``?format=fhir``."""
    state.check_ready()
    data = await read_upload(state, file)
    http.state.audit.document(data)
    if state.served.engine is None:
        response = await ocr_extract(state, data, http.state.audit.request_id)
    else:
        prompt = await state.prepare(data, EXTRACTION_PROMPT)
        result = await state.generate(prompt, SamplingParams(state.answer_tokens(prompt), response_format=RECORD_FORMAT),
                                      http)
        response = ExtractResponse(request_id=http.state.audit.request_id, **structured_result(result.text),
                                   raw_text=result.text, closed_early=result.closed_early, latency_s=result.latency_s,
                                   usage=usage(result), model=state.model_info())
    if format == "record":
        return response
    bundle = record_bundle(response.structured.model_dump(), http.state.audit.document_sha256,
                           file.content_type or "application/octet-stream", len(data), state.audit_model())
    return Response(bundle.model_dump_json(), media_type="application/fhir+json")


async def ocr_extract(state: ServerState, data: bytes, request_id: str) -> ExtractResponse:
    """/extract from the OCR + rules baseline: the record its rules read, with the same flags."""
    return ExtractResponse(request_id=request_id, **await state.ocr_extract(data),
                           usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), model=state.model_info())


@router.post("/analyze", response_model=AnalyzeResponse, responses=ERROR_RESPONSES)
async def analyze(http: Request, state: State, file: Annotated[UploadFile, File(description="a document image")],
                  prompt: Annotated[str, Form()] = "Describe this medical document."):
    """Free-text answer to a prompt about a document image."""
    state.engine()
    prompt = check_prompt(prompt)
    data = await read_upload(state, file)
    http.state.audit.document(data)
    prepared = await state.prepare(data, prompt)
    result = await state.generate(prepared, SamplingParams(state.answer_tokens(prepared)), http)
    return AnalyzeResponse(request_id=http.state.audit.request_id, text=result.text, latency_s=result.latency_s,
                           usage=usage(result), model=state.model_info())


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
