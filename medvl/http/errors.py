"""One error envelope for every failure, whatever raised it::

    {"error": {"status": 400, "code": "bad_image", "message": "not a readable image (...)", "param": null}}

Statuses: 400 bad image/prompt/base64/parameter, a response format whose JSON schema does not
compile, or a request longer than the context, 401
missing or wrong API key, 404 unknown route, model or filed document, 409 a review saved over
another reviewer's, 413 file or image too large, 422 missing or malformed field or decision, 503 model not ready or too many requests waiting (both with
``Retry-After``), 504 request timed out.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medvl.engine.grammar import GrammarError
from medvl.engine.images import BadInput
from medvl.engine.scheduler import EngineDead, Overloaded, PromptTooLong
from medvl.http.schemas import ErrorEnvelope

log = logging.getLogger("medvl.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None):
        self.status, self.code, self.message, self.headers, self.param = status, code, message, headers or {}, param


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None,
             param: str | None = None) -> JSONResponse:
    body = {"status": status, "code": code, "message": message, "param": param}
    return JSONResponse({"error": body}, status, headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope} for code in (400, 401, 404, 409, 413, 422, 503, 504)}


def validation_envelope(exc: RequestValidationError) -> JSONResponse:
    """422 for a missing or malformed field; 400 naming the field for one this server does not take."""
    errors = exc.errors()
    unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        return envelope(400, "unsupported_parameter", f"unsupported parameter(s): {', '.join(unknown)}",
                        param=unknown[0])
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []))}: {e.get('msg')}" for e in errors)
    return envelope(422, "invalid_request", problems[:2000])


def install_error_handlers(app: FastAPI) -> None:
    """Every exception the routes raise leaves as the envelope."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return envelope(exc.status, exc.code, exc.message, exc.headers, exc.param)

    @app.exception_handler(BadInput)
    async def bad_input(_: Request, exc: BadInput):
        return envelope(exc.status, exc.code, str(exc))

    @app.exception_handler(PromptTooLong)
    async def too_long(_: Request, exc: PromptTooLong):
        return envelope(400, "context_length_exceeded", str(exc), param="max_tokens")

    @app.exception_handler(GrammarError)
    async def bad_grammar(_: Request, exc: GrammarError):
        return envelope(400, "invalid_response_format", str(exc), param="response_format")

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded):
        return envelope(503, "overloaded", str(exc), {"Retry-After": "1"})

    @app.exception_handler(EngineDead)
    async def engine_dead(_: Request, exc: EngineDead):  # the process exits shortly; a new one takes over
        return envelope(503, "engine_dead", str(exc), {"Retry-After": "10"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return validation_envelope(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return envelope(exc.status_code, "http_error", str(exc.detail))
