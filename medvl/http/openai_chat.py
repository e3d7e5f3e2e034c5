"""OpenAI-compatible chat completions and model list, through the same engine as every route.

Every parameter the request schema accepts is honoured (``max_tokens`` per row, ``temperature``,
``top_p``, ``seed``, ``stop``, ``stream`` with ``stream_options.include_usage``, ``response_format``
``text``, ``json_object`` or ``json_schema``: decoded under the grammar, medvl/engine/grammar.py;
``logprobs`` and ``top_logprobs`` up to 20, streamed and not, computed on the GPU in the decoding
step: see medvl.engine.scheduler.token_logprobs for the distribution) or refused with a 400 naming
it (``n`` > 1, ``top_logprobs`` without ``logprobs``, penalties, a schema that does not compile,
unknown fields). Streams share the running batch with every other request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from medvl.engine.grammar import ResponseFormat
from medvl.engine.images import BadInput
from medvl.engine.scheduler import EngineDead, SamplingParams, TokenLogprob
from medvl.engine.scheduler import Request as EngineRequest
from medvl.engine.tokens import token_bytes
from medvl.http.audit import RequestAudit
from medvl.http.errors import ERROR_RESPONSES, ApiError
from medvl.http.schemas import ChatRequest, ModelCard, ModelList
from medvl.http.state import ServerState, State, check_prompt, usage

router = APIRouter()
STARTED = int(time.time())
MAX_STOP_STRINGS = 4


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State):
    """The one model this server serves (OpenAI clients and UIs call this first)."""
    return ModelList(data=[ModelCard(id=state.config.served_model_name, created=STARTED)])


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(body: ChatRequest, http: Request, state: State):
    """OpenAI-compatible chat: text and image_url parts (data: URLs), streaming or not."""
    if body.model != state.config.served_model_name:
        raise ApiError(404, "model_not_found", f"the model {body.model!r} does not exist; this server serves "
                       f"{state.config.served_model_name!r} (GET /v1/models)", param="model")
    params = sampling_params(body, state.settings.api.max_new_tokens)
    engine = state.engine()
    if params.response_format is not None:
        # A schema that does not compile is a 400 before anything runs (compiled off the event loop; cached).
        await asyncio.to_thread(engine.grammars.compile, params.response_format)
    messages, image = chat_to_messages(body)
    if image is not None:
        http.state.audit.document(image, pages=1)
    prompt = await state.prepare_chat(image, messages)
    params = replace(params, max_tokens=state.answer_tokens(prompt, body.max_completion_tokens or body.max_tokens))
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        # Submitted before the response starts: a request over the context, a full queue or a dead
        # engine answers with its own status (400, 503), not with a 200 and an empty stream.
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        request = engine.submit(prompt, params, lambda piece, logprobs: loop.call_soon_threadsafe(
            pieces.put_nowait, (piece, logprobs)))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_chat(state, request, pieces, completion_id, created, body.model,
                                             include_usage, http.state.audit), media_type="text/event-stream")
    result = await state.wait(engine.submit(prompt, params), http)
    logprobs = None if result.logprobs is None else logprobs_body(engine.processor.tokenizer, result.logprobs)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": logprobs, "finish_reason": result.finish_reason}],
            "usage": usage(result).model_dump()}


def logprobs_body(tokenizer: Any, entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs``: ``{"content": [{"token", "logprob", "bytes",
    "top_logprobs": [...]}]}``, one entry per generated token (an end-of-sequence token
    included, with its own text). An alternative the grammar forbids (fewer allowed tokens than
    asked for) has probability 0: its log-probability is sent as -9999.0, as OpenAI and vLLM do
    (JSON has no -inf)."""
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]}


def refuse(param: str, why: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", f"{param}: {why}", param=param)


def sampling_params(body: ChatRequest, default_max_tokens: int) -> SamplingParams:
    """The request's sampling settings, or a 400 naming the first parameter this server does not do."""
    if body.n not in (None, 1):
        raise refuse("n", "only one choice per request is generated (n=1)")
    if body.top_logprobs is not None and not body.logprobs:
        raise refuse("top_logprobs", "requires logprobs=true")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name):
            raise refuse(name, "not supported (the model's own repetition penalty applies)")
    fmt = response_format(body.response_format)
    if fmt is not None and body.ignore_eos:
        raise refuse("ignore_eos", "not with a response_format (the answer ends where its JSON ends)")
    if body.stream_options is not None and not body.stream:
        raise refuse("stream_options", "only allowed with stream=true")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise refuse("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    return SamplingParams(max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
                          temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, seed=body.seed,
                          stop=tuple(s for s in stops if s), ignore_eos=body.ignore_eos, response_format=fmt,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else None)


def response_format(value: dict[str, Any] | None) -> ResponseFormat | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (free), ``{"type": "json_object"}`` (any
    JSON object), ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``."""
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_object()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "invalid_response_format", "response_format.json_schema.schema: a JSON schema "
                           "object is required", param="response_format")
        return ResponseFormat.json_schema(spec["schema"])
    raise ApiError(400, "invalid_response_format", f"response_format.type {kind!r}: one of 'text', 'json_object', "
                   "'json_schema'", param="response_format")


def chat_to_messages(body: ChatRequest) -> tuple[list[dict[str, Any]], bytes | None]:
    """OpenAI messages -> Qwen chat messages plus the image's bytes (at most one; decoded later,
    off the event loop)."""
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
            image = decode_data_url(part.image_url.url if part.image_url else "")
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


async def stream_chat(state: ServerState, request: EngineRequest, pieces: asyncio.Queue, completion_id: str,
                      created: int, model: str, include_usage: bool, audit: RequestAudit) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chat.completion.chunk format, as the engine produces text.

    The request was submitted before the response started (so a full queue or an over-long
    request answered with its status); an error after the first event is sent as an error event
    followed by ``data: [DONE]``; a client that hangs up cancels the request (its slot frees).
    """
    loop = asyncio.get_running_loop()

    tokenizer = state.engine().processor.tokenizer
    asked = request.params.logprobs is not None

    def event(delta: dict[str, Any] | None, finish: str | None = None, usage_body: dict[str, Any] | None = None,
              logprobs: list[TokenLogprob] | None = None) -> str:
        body = logprobs_body(tokenizer, logprobs or []) if asked and delta is not None else None
        payload: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model,
                                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": body,
                                                                         "finish_reason": finish}]}
        if include_usage:
            payload["usage"] = usage_body
        return f"data: {json.dumps(payload)}\n\n"

    future = asyncio.wrap_future(request.future)
    deadline = loop.time() + state.settings.api.request_timeout_s
    getter: asyncio.Future | None = None
    try:
        yield event({"role": "assistant", "content": ""})
        while not future.done():
            getter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({getter, future}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                piece, logprobs = getter.result()
                yield event({"content": piece}, logprobs=logprobs)
                continue
            getter.cancel()
            if not done:  # the request's time is up
                request.cancel()
                error = {"status": 504, "code": "timeout", "message": "stream timed out"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                yield "data: [DONE]\n\n"
                return
        while not pieces.empty():
            piece, logprobs = pieces.get_nowait()
            yield event({"content": piece}, logprobs=logprobs)
        try:
            result = future.result()
        except EngineDead as exc:
            error = {"status": 503, "code": "engine_dead", "message": str(exc)[:300]}
            yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
            return
        except Exception as exc:  # the engine failed this request (and only this one)
            error = {"status": 500, "code": "generation_failed", "message": f"{type(exc).__name__}: {exc}"[:300]}
            yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
            return
        audit.tokens = usage(result).model_dump()
        yield event({}, result.finish_reason)
        if include_usage:
            yield event(None, usage_body=usage(result).model_dump())
        yield "data: [DONE]\n\n"
    finally:
        request.cancel()  # a no-op once finished; frees the slot when the client went away
        if getter is not None and not getter.done():
            getter.cancel()  # a client that hung up leaves the wait for the next piece pending
