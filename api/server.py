"""The medvl HTTP API: structured extraction, free analysis, OpenAI-compatible chat.

Start it with ``python -m api.server`` (``--help`` lists every option; each also reads a
``MEDVL_*`` environment variable). The model loads in the background: until it is ready
every inference route answers 503 with ``Retry-After`` and ``/health`` says
``model_loaded: false``. One worker thread owns the model and batches requests that arrive
together. Every error, whatever raised it, leaves as the same envelope::

    {"error": {"status": 400, "code": "bad_image", "message": "not a readable image (...)"}}

Statuses: 400 bad image/prompt/base64, 401 missing or wrong API key, 404 unknown route,
413 file or image too large, 422 missing or malformed field, 503 model not ready,
504 request timed out. Uploads are read into memory and never written to disk.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi import FastAPI, File, Form, Request, UploadFile  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.middleware.cors import CORSMiddleware  # noqa: E402
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from medvl.inference import (  # noqa: E402
    BadInput,
    GenerationRequest,
    GenerationResult,
    InferenceEngine,
    decode_image,
    structured_result,
)
from medvl.prompts import EXTRACTION_PROMPT  # noqa: E402
from medvl.settings import load_settings  # noqa: E402
from medvl.workdir import Workdir  # noqa: E402

log = logging.getLogger("medvl.api")

MAX_PROMPT_CHARS = 4000


# --------------------------------------------------------------------------- configuration


@dataclass
class ServerConfig:
    """Every server setting; each has a MEDVL_<NAME> environment variable and a --flag."""

    model_path: str = ""  # default: the best model the pipeline produced (see resolve_model)
    profile: str = "tiny"
    workdir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    cors_origins: list[str] = field(default_factory=list)
    api_key: str = ""
    request_timeout_s: float = 120.0
    max_batch_size: int = 8
    max_new_tokens: int = 512

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> ServerConfig:
        defaults = cls()
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        for name, value in asdict(defaults).items():
            env = os.environ.get(f"MEDVL_{name.upper()}")
            if isinstance(value, list):
                default = [o for o in (env or "").split(",") if o] if env is not None else value
                parser.add_argument(f"--{name.replace('_', '-')}", default=default,
                                    type=lambda s: [o for o in s.split(",") if o], help=f"comma-separated (env MEDVL_{name.upper()})")
            else:
                kind = type(value)
                parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                                    default=kind(env) if env is not None else value,
                                    help=f"(env MEDVL_{name.upper()}, default %(default)r)")
        return cls(**vars(parser.parse_args(argv)))


def int4_serving(settings: Any) -> bool:
    """Serve 4-bit as torchao int4 (quantized at start-up from the bf16 checkpoint) rather than
    bitsandbytes NF4: on a CUDA GPU, with the compiled static-cache decoder, when torchao is
    installed. NF4 decodes at ~26-43 tokens/s on an H100 where int4 reaches ~264-271
    (docs/results/h100/perf_inference*.json)."""
    import importlib.util

    import torch

    return (settings.quant.serve_quantized and settings.decode.static_cache and torch.cuda.is_available()
            and importlib.util.find_spec("torchao") is not None)


def resolve_model(config: ServerConfig) -> tuple[Path, str]:
    """The model to serve: --model-path, else the best the pipeline produced: fine-tuned int4
    (see :func:`int4_serving`), fine-tuned NF4, fine-tuned merged (profiles that serve full
    precision), base int4, base NF4, base."""
    settings = load_settings(config.profile)
    wd = Workdir.at(config.workdir or None)
    if config.model_path:
        return Path(config.model_path), "custom"
    int4 = int4_serving(settings)
    candidates = (*(((wd.merged_model_dir(settings), "finetuned-int4"),) if int4 else ()),
                  (wd.finetuned_nf4_dir(settings), "finetuned-nf4"), (wd.merged_model_dir(settings), "finetuned"),
                  *(((wd.base_model_dir(settings), "base-int4"),) if int4 else ()),
                  (wd.nf4_model_dir(settings), "base-nf4"), (wd.base_model_dir(settings), "base"))
    for path, kind in candidates:
        if (path / "config.json").is_file():
            return path, kind
    raise SystemExit(f"no model found under {wd.models}; run the pipeline first or pass --model-path")


# --------------------------------------------------------------------------- schemas


class Medication(BaseModel):
    name: str = ""
    dose: str = ""
    route: str = ""
    frequency: str = ""


class LabValue(BaseModel):
    name: str = ""
    value: str = ""
    unit: str = ""
    flag: str = ""


class Structured(BaseModel):
    medications: list[Medication] = []
    diagnoses: list[str] = []
    procedures: list[str] = []
    lab_values: list[LabValue] = []
    vitals: dict[str, str] = {}


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelInfo(BaseModel):
    path: str
    kind: str
    device: str


class FlagItem(BaseModel):
    rule: str
    item: str
    value: str
    reason: str
    severity: Literal["info", "warning", "error"]


class ExtractResponse(BaseModel):
    request_id: str
    structured: Structured
    flags: list[FlagItem] = Field(description="plausibility and safety flags (medvl/flags.py)")
    disclaimer: str
    parse_status: Literal["json", "repaired", "fallback"] = Field(
        description="json: the answer parsed as JSON; repaired: after fixing brackets/commas; "
                    "fallback: no JSON - drugs and conditions found in the raw text")
    raw_text: str
    latency_s: float
    usage: Usage
    model: ModelInfo


class AnalyzeResponse(BaseModel):
    request_id: str
    text: str
    latency_s: float
    usage: Usage
    model: ModelInfo


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error"]
    model_loaded: bool
    model_path: str
    device: str
    gpu_name: str | None
    gpu_memory_used_mb: float | None
    queue_depth: int
    decoding: str = ""  # e.g. "static cache, compiled step, int4 (torchao)"
    startup_s: dict[str, float] = {}  # load, quantize, decoder warm-up (compilation): paid once per start
    error: str | None = None


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class ChatImageUrl(BaseModel):
    url: str


class ChatPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ChatImageUrl | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ChatPart]


class ChatRequest(BaseModel):
    model: str = "medvl"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stream: bool = False


# --------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 413, 422, 503, 504)}


# --------------------------------------------------------------------------- the app


def create_app(config: ServerConfig, engine: InferenceEngine | None = None, model_kind: str = "custom") -> FastAPI:
    """Build the app; the engine starts loading when the app starts (lifespan)."""
    if engine is None:
        model_dir, model_kind = resolve_model(config)
        engine = InferenceEngine(model_dir, load_settings(config.profile), config.max_batch_size,
                                 int4=model_kind.endswith("int4"))
    wd = Workdir.at(config.workdir or None)
    max_bytes = int(config.max_upload_mb * 2**20)
    registry = CollectorRegistry()
    metrics = {
        "requests": Counter("medvl_requests_total", "Requests by route and status", ["route", "status"], registry=registry),
        "latency": Histogram("medvl_request_latency_seconds", "Request latency", ["route"], registry=registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
        "queue": Gauge("medvl_queue_depth", "Requests waiting for the model", registry=registry),
        "tokens": Counter("medvl_tokens_generated_total", "Tokens generated", registry=registry),
        "loaded": Gauge("medvl_model_loaded", "1 when the model is ready", registry=registry),
    }
    access = _access_logger(wd)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="medvl API", version="0.1.0", lifespan=lifespan,
                  description="Medical document understanding with a QLoRA-fine-tuned Qwen2.5-VL.")
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    # ---- cross-cutting: key, log, metrics, errors
    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        started = time.perf_counter()
        route = request.url.path
        if config.api_key and route not in ("/health",) and request.method != "OPTIONS":
            given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if given != config.api_key:
                response = envelope(401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer token)")
                _record(metrics, access, route, request.method, response.status_code, started)
                return response
        try:
            response = await call_next(request)
        except Exception:  # never a bare 500 with a traceback
            log.exception("unhandled error on %s", route)
            response = envelope(500, "internal_error", "internal error; see the server log")
        _record(metrics, access, route, request.method, response.status_code, started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return envelope(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, exc: BadInput):
        return envelope(exc.status, exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in exc.errors())
        return envelope(422, "invalid_request", problems[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return envelope(exc.status_code, "http_error", str(exc.detail))

    # ---- helpers shared by the routes
    def require_ready() -> None:
        if engine.error:
            raise ApiError(503, "model_failed", f"the model failed to load: {engine.error}")
        if not engine.ready.is_set():
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly", {"Retry-After": "5"})

    async def run(request: GenerationRequest) -> GenerationResult:
        metrics["queue"].set(engine.queue_depth() + 1)
        future = engine.submit(request)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=config.request_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise ApiError(504, "timeout", f"no answer within {config.request_timeout_s:.0f} s") from None
        finally:
            metrics["queue"].set(engine.queue_depth())
        metrics["tokens"].inc(result.generated_tokens)
        return result

    async def read_upload(file: UploadFile) -> Any:
        data = await file.read(max_bytes + 1)
        return decode_image(data, max_bytes, config.max_image_pixels)

    def model_info() -> ModelInfo:
        return ModelInfo(path=str(engine.model_dir), kind=model_kind, device=engine.device)

    def usage(result: GenerationResult) -> Usage:
        return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                     total_tokens=result.prompt_tokens + result.generated_tokens)

    # ---- routes
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        used = torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None
        status = "error" if engine.error else ("ok" if engine.ready.is_set() else "loading")
        body = HealthResponse(status=status, model_loaded=engine.ready.is_set(), model_path=str(engine.model_dir),
                              device=engine.device, gpu_name=gpu, gpu_memory_used_mb=used,
                              queue_depth=engine.queue_depth(), decoding=engine.decoding,
                              startup_s=engine.startup_s, error=engine.error)
        metrics["loaded"].set(1 if engine.ready.is_set() else 0)
        return JSONResponse(body.model_dump(), status_code=200 if status == "ok" else 503,
                            headers=None if status == "ok" else {"Retry-After": "5"})

    @app.post("/extract", response_model=ExtractResponse, responses=ERROR_RESPONSES)
    async def extract(file: Annotated[UploadFile, File(description="a document image (PNG, JPEG, ...)")]):
        """Structured medical record from a document image."""
        require_ready()
        image = await read_upload(file)
        result = await run(GenerationRequest(image, EXTRACTION_PROMPT, config.max_new_tokens))
        extracted = structured_result(result.text)
        return ExtractResponse(request_id=uuid.uuid4().hex, **extracted, raw_text=result.text,
                               latency_s=result.latency_s, usage=usage(result), model=model_info())

    @app.post("/analyze", response_model=AnalyzeResponse, responses=ERROR_RESPONSES)
    async def analyze(file: Annotated[UploadFile, File(description="a document image")],
                      prompt: Annotated[str, Form()] = "Describe this medical document."):
        """Free-text answer to a prompt about a document image."""
        require_ready()
        prompt = check_prompt(prompt)
        image = await read_upload(file)
        result = await run(GenerationRequest(image, prompt, config.max_new_tokens))
        return AnalyzeResponse(request_id=uuid.uuid4().hex, text=result.text, latency_s=result.latency_s,
                               usage=usage(result), model=model_info())

    @app.get("/benchmark")
    async def benchmark_files():
        """Every benchmark JSON of the run, by name (settings blocks left out)."""
        out: dict[str, Any] = {}
        for path in sorted(wd.benchmarks.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                data.pop("settings", None)
            out[path.stem] = data
        return out

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics():
        metrics["queue"].set(engine.queue_depth())
        metrics["loaded"].set(1 if engine.ready.is_set() else 0)
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(body: ChatRequest):
        """OpenAI-compatible chat: text and image_url parts (data: URLs), streaming or not."""
        require_ready()
        messages, image = chat_to_messages(body, max_bytes, config.max_image_pixels)
        max_new = min(body.max_tokens or config.max_new_tokens, config.max_new_tokens)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            result = await run(GenerationRequest(image, "", max_new, messages=messages))
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason}],
                    "usage": usage(result).model_dump()}
        return StreamingResponse(stream_chat(engine, image, messages, max_new, completion_id, created, body.model,
                                             config.request_timeout_s), media_type="text/event-stream")

    return app


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise BadInput("the prompt is empty", 400, "bad_prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}", 400, "bad_prompt")
    return prompt


def chat_to_messages(body: ChatRequest, max_bytes: int, max_pixels: int) -> tuple[list[dict[str, Any]], Any]:
    """OpenAI messages -> Qwen chat messages plus the decoded image (at most one)."""
    messages: list[dict[str, Any]] = []
    image = None
    for message in body.messages:
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": [{"type": "text", "text": check_prompt(message.content)}]})
            continue
        parts: list[dict[str, Any]] = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": check_prompt(part.text or "")})
                continue
            if image is not None:
                raise BadInput("one image per request is supported", 400, "too_many_images")
            image = decode_image(decode_data_url(part.image_url.url if part.image_url else ""), max_bytes, max_pixels)
            parts.append({"type": "image"})
        messages.append({"role": message.role, "content": parts})
    return messages, image


def decode_data_url(url: str) -> bytes:
    """data:image/...;base64,... -> bytes. Remote URLs are refused: the server fetches nothing."""
    if not url.startswith("data:"):
        raise BadInput("image_url must be a data: URL (base64); remote URLs are not fetched", 400, "bad_image_url")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise BadInput("image_url data must be base64-encoded", 400, "bad_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image_url holds invalid base64", 400, "bad_base64") from None


async def stream_chat(engine: InferenceEngine, image: Any, messages: list[dict[str, Any]], max_new: int,
                      completion_id: str, created: int, model: str, timeout: float):
    """Server-sent events in OpenAI's chat.completion.chunk format, as tokens are produced."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(engine.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=timeout)
    future = engine.submit(GenerationRequest(image, "", max_new, messages=messages, streamer=streamer))

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant"})
    loop = asyncio.get_running_loop()
    iterator = iter(streamer)
    while True:
        try:
            piece = await loop.run_in_executor(None, next, iterator, None)
        except Exception:  # the streamer's queue timed out
            yield f"data: {json.dumps({'error': {'status': 504, 'code': 'timeout', 'message': 'stream timed out'}})}\n\n"
            break
        if piece is None:
            break
        if piece:
            yield chunk({"content": piece})
    finish = "length"
    try:
        finish = (await asyncio.wrap_future(future)).finish_reason
    except Exception:
        pass
    yield chunk({}, finish)
    yield "data: [DONE]\n\n"


def _access_logger(wd: Workdir) -> logging.Logger:
    """logs/api.log: one line per request (time, method, route, status, latency)."""
    logger = logging.getLogger("medvl.api.access")
    if not logger.handlers:
        wd.logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(wd.logs / "api.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _record(metrics: dict[str, Any], access: logging.Logger, route: str, method: str, status: int,
            started: float) -> None:
    elapsed = time.perf_counter() - started
    known = route if route in ("/extract", "/analyze", "/health", "/benchmark", "/metrics",
                               "/v1/chat/completions") else "other"
    metrics["requests"].labels(known, str(status)).inc()
    metrics["latency"].labels(known).observe(elapsed)
    access.info("%s %s %d %.4f", method, route, status, elapsed)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig.from_env_and_args(argv)
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


if __name__ == "__main__":
    main()
