"""What every route reads: the settings, the served model, the metrics; and how a route runs a
request through the engine (timeouts and hang-ups cancel the request and free its slot)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from medvl.core.settings import SERVED_SETTINGS, Settings
from medvl.core.workdir import Workdir
from medvl.engine.images import BadInput, decode_image
from medvl.engine.loader import Served
from medvl.engine.pages import PageLimits, decode_pages
from medvl.engine.scheduler import Engine, Overloaded, Prompt, Result, SamplingParams
from medvl.engine.scheduler import Request as EngineRequest
from medvl.http.config import ServerConfig
from medvl.http.errors import ApiError
from medvl.http.metrics import ServerMetrics
from medvl.http.schemas import ModelInfo, Usage
from medvl.medical import ocr

log = logging.getLogger("medvl.api")
T = TypeVar("T")

MAX_PROMPT_CHARS = 4000
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerState:
    config: ServerConfig
    served: Served
    model_kind: str
    metrics: ServerMetrics
    workdir: Workdir
    review: Any = None  # api.review_store: its medvl.review.store.ReviewStore (medvl/http/review.py)
    preparing: int = 0  # requests admitted to preparation (decoding, templating), not yet submitted
    _admission_lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None  # api.prepare_threads threads, made on first use
    _ocr_pool: ThreadPoolExecutor | None = None

    @property
    def prepare_pool(self) -> ThreadPoolExecutor:
        """Decoding, the processor and the vision tower for arriving requests (Engine.prepare),
        and the pages' reading where it is part of that (grounded prompts, ``--model ocr``): at
        least as many threads as pages the OCR reads at once (api.ocr_workers)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(self.settings.api.prepare_threads, ocr.pages_at_once()),
                                            thread_name_prefix="prepare")
        return self._pool

    async def in_ocr_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` (the pages' OCR for source boxes) in an OCR thread: one per page the OCR
        reads at once (one without a reading pool: it reads one page at a time anyway, and one
        thread keeps one malloc arena)."""
        if self._ocr_pool is None:
            self._ocr_pool = ThreadPoolExecutor(ocr.pages_at_once(), thread_name_prefix="ocr")
        return await asyncio.get_running_loop().run_in_executor(self._ocr_pool, work)

    @property
    def settings(self) -> Settings:
        return self.config.settings

    @property
    def max_bytes(self) -> int:
        return int(self.settings.api.max_upload_mb * 2**20)

    def check_ready(self) -> None:
        """A 503 while the model (or the OCR engine) loads or after it failed to."""
        if self.served.error:
            raise ApiError(503, "model_failed", f"the model failed to load: {self.served.error}")
        if not self.served.ready.is_set():
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly", {"Retry-After": "5"})
        if self.served.engine is not None and self.served.engine.dead is not None:
            raise self.served.engine.dead  # 503 engine_dead (medvl/http/errors.py)

    def engine(self) -> Engine:
        """The engine, or a 503 while it is not ready; a 400 when the server runs the OCR
        baseline, which answers /extract only."""
        self.check_ready()
        if self.served.engine is None:
            raise ApiError(400, "unsupported_by_model", "this server runs the OCR + rules baseline (--model ocr), "
                           "which answers /extract only; start it with a model for this route")
        return self.served.engine

    def audit_model(self) -> dict[str, str]:
        """What every audit line names about the model: its folder, served form, settings hash."""
        return {"model_path": str(self.served.model_dir), "served_form": self.served.form,
                "settings_hash": self.settings.fingerprint(SERVED_SETTINGS)}

    def model_info(self) -> ModelInfo:
        return ModelInfo(path=str(self.served.model_dir), kind=self.model_kind, form=self.served.form,
                         device=self.served.device)

    def decode_image(self, data: bytes) -> Any:
        return decode_image(data, self.max_bytes, self.settings.api.max_image_pixels)

    def decode_pages(self, data: bytes) -> list[Any]:
        """An upload's pages: an image is one, a PDF is rendered page by page (medvl/engine/pages.py)."""
        return decode_pages(data, PageLimits.from_settings(self.settings.api))

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """A place among the requests being prepared, or :class:`Overloaded` (503 with
        Retry-After) before any expensive work: requests in preparation and those waiting for a
        slot together stay within ``decode.max_waiting`` (they once queued without bound for the
        two preparation threads, ahead of the engine's own limit)."""
        engine = self.served.engine
        with self._admission_lock:
            waiting = engine.num_waiting if engine is not None else 0
            if self.preparing + waiting >= self.settings.decode.max_waiting:
                raise Overloaded(f"{self.preparing} requests are being prepared and {waiting} wait for a slot "
                                 "(decode.max_waiting); retry shortly")
            self.preparing += 1
        try:
            yield
        finally:
            with self._admission_lock:
                self.preparing -= 1

    async def _prepared(self, work: Callable[[], T]) -> T:
        """``work`` (image decoding, template and image processing) in a worker thread, off the
        event loop and the engine, once admitted (:meth:`admission`).

        Two threads of its own rather than the server's pool of 40: the processor runs one
        request at a time anyway (see ``Engine.prepare``), and every thread that allocates a
        page's tensors gets a malloc arena of its own: with the shared pool the server's resident
        memory grew by ~340 MB in its first 10 s of load before levelling off (tiny, CPU).
        """
        with self.admission():
            return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, work)

    async def prepare_chat(self, data: bytes | None, messages: list[dict[str, Any]]) -> Prompt:
        """A chat's messages as sent, with its image (if any) decoded and checked."""
        engine = self.engine()
        return await self._prepared(
            lambda: engine.prepare(self.decode_image(data) if data is not None else None, messages=messages))

    async def prepare_pages(self, data: bytes, prompt: str) -> tuple[list[Prompt], list[Any]]:
        """Every page of an upload (an image is one page, a PDF many) decoded and prepared with
        ``prompt`` (as in training: OCR-grounded when the profile says so); one admission per
        document. Returns the prompts and the page images (kept in memory for the request only)."""
        engine = self.engine()

        def prepare() -> tuple[list[Prompt], list[Any]]:
            pages = self.decode_pages(data)
            return [engine.prepare(page, self.served.prompt_for(page, prompt)) for page in pages], pages

        return await self._prepared(prepare)

    async def ocr_extract(self, data: bytes) -> tuple[list[dict[str, Any]], list[Any]]:
        """The OCR baseline's result for each page (``--model ocr``), decoded and read in a worker
        thread, and the page images (kept in memory for the request only: filing for review
        stores them, and a PDF is rendered once)."""
        def read() -> tuple[list[dict[str, Any]], list[Any]]:
            pages = self.decode_pages(data)
            return [ocr.structured_result(page) for page in pages], pages

        return await self._prepared(read)

    async def wait(self, request: EngineRequest, http: Request) -> Result:
        """The request's result; on timeout (504) or client hang-up the request is cancelled."""
        return (await self.wait_all([request], http))[0]

    async def wait_all(self, requests: list[EngineRequest], http: Request) -> list[Result]:
        """The requests' results (a document's pages), in order. On timeout (504), client
        hang-up or any request's failure, every one still running is cancelled (its slot freed)."""
        loop = asyncio.get_running_loop()
        futures = [asyncio.wrap_future(request.future) for request in requests]
        deadline = loop.time() + self.settings.api.request_timeout_s
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ApiError(504, "timeout", f"no answer within {self.settings.api.request_timeout_s:.0f} s")
                pending = [future for future in futures if not future.done()]
                if not pending:
                    results = [future.result() for future in futures]
                    http.state.audit.tokens = sum_usage(results).model_dump()
                    return results
                done, _ = await asyncio.wait(pending, timeout=min(DISCONNECT_POLL_S, remaining),
                                             return_when=asyncio.FIRST_EXCEPTION)
                for future in done:
                    if future.exception() is not None:
                        raise future.exception()  # the others are cancelled on the way out
                if not done and await http.is_disconnected():
                    raise ApiError(499, "client_closed", "the client closed the connection")
        finally:
            for request in requests:
                if not request.future.done():
                    request.cancel()

    def answer_tokens(self, prompt: Prompt, requested: int | None = None) -> int:
        """``max_tokens`` for a request: what the client asked for, else the context the prompt
        leaves, capped by ``api.max_new_tokens`` (as vLLM defaults it). A prompt that leaves no
        room is a 400 naming the prompt, not a parameter the client never sent."""
        if requested is not None:
            return requested
        limit = self.engine().decoder.max_cache_len
        room = limit - prompt.length
        if room <= 0:
            raise ApiError(400, "context_length_exceeded", f"the prompt is {prompt.length} tokens (image included); "
                           f"the context holds {limit} (decode.max_cache_len), which leaves no room for an answer",
                           param="messages")
        return min(self.settings.api.max_new_tokens, room)

    async def generate_pages(self, prompts: list[Prompt], params: list[SamplingParams], http: Request) -> list[Result]:
        """A document's pages submitted together (they prefill and decode side by side as the
        engine's batch allows), their results in page order; one refused page (overload, a
        prompt too long) cancels those already queued."""
        return await self.wait_all(self.engine().submit_many(prompts, params), http)


def server_state(request: Request) -> ServerState:
    return request.app.state.medvl


State = Annotated[ServerState, Depends(server_state)]  # what a route declares to get the state


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise BadInput("the prompt is empty", 400, "bad_prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise BadInput(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}", 400, "bad_prompt")
    return prompt


def usage(result: Result) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.generated_tokens,
                 total_tokens=result.prompt_tokens + result.generated_tokens)


def sum_usage(results: list[Result]) -> Usage:
    """A document's tokens: its pages' together."""
    prompt, completion = sum(r.prompt_tokens for r in results), sum(r.generated_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
