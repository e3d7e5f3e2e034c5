"""The medvl HTTP API: structured extraction, free analysis, OpenAI-compatible chat.

Start it with ``python -m medvl.http.server`` (``--help`` lists every option; each also reads a
``MEDVL_*`` environment variable). The model loads, and the engine compiles its decoding
steps, in the background: until then every inference route answers 503 with ``Retry-After``
and ``/health`` says ``model_loaded: false``. One engine (medvl/engine/scheduler.py) serves every route
with continuous batching: requests join the running batch as rows free up.

Layout, as vLLM's OpenAI server lays it out: this module wires the app and runs it;
``config`` (flags and environment), ``schemas`` (bodies), ``errors`` (the one envelope),
``routes`` and ``openai_chat`` (the routes), ``state`` (what routes share), ``metrics``.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import Headers

from medvl.core.workdir import Workdir
from medvl.engine.loader import Served
from medvl.http import openai_chat, review, routes
from medvl.http.audit import REQUEST_ID_HEADER, AuditTrail, RequestAudit, client_fingerprint, request_id
from medvl.http.config import ServerConfig, served_model
from medvl.http.errors import envelope, install_error_handlers
from medvl.http.metrics import ServerMetrics
from medvl.http.state import ServerState
from medvl.http.uploads import BodyLimit, body_limit, keep_uploads_in_memory
from medvl.review.errors import ReviewKeyError

log = logging.getLogger("medvl.api")


def create_app(config: ServerConfig, served: Served | None = None, model_kind: str = "custom") -> FastAPI:
    """Wire the app; the served model starts loading when the app starts (lifespan)."""
    metrics = ServerMetrics(config.served_model_name)
    wd = Workdir.at(config.workdir or None)
    if served is None:
        served, model_kind = served_model(config, wd, metrics)
    # The review store opens (and migrates) before traffic; without its key the server does not
    # start. Imported only then: its database and crypto libraries are not the server's own.
    store = None
    if config.settings.api.review_store:
        from medvl.review.store import ReviewStore

        store = ReviewStore.open(wd.root)
    state = ServerState(config, served, model_kind, metrics, wd, review=store)
    access = _access_logger(state.workdir)
    audit_trail = AuditTrail(state.workdir.logs / "audit.jsonl", config.settings.api.audit_max_mb,
                             config.settings.api.audit_backups, state.audit_model())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.start()
        yield
        served.stop()
        if store is not None:
            store.close()

    app = FastAPI(title="medvl API", version="0.2.0", lifespan=lifespan,
                  description="Medical document understanding with a QLoRA-fine-tuned Qwen2.5-VL.")
    app.state.medvl = state
    limit = body_limit(config.settings.api.max_upload_mb)
    keep_uploads_in_memory(limit)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    @app.middleware("http")
    async def guard_and_log(request: Request, call_next):
        """API key (all routes but /health), a request id (``X-Request-ID``), one access-log
        line, one audit line and metrics per request, and never a bare 500 with a traceback."""
        started = time.perf_counter()
        route = request.url.path
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        audit = RequestAudit(request_id(request.headers.get(REQUEST_ID_HEADER)), client_fingerprint(given or None))
        request.state.audit = audit

        def record(status: int) -> None:
            _record(state, access, route, request.method, status, started)
            audit_trail.write(audit, request.method, route, status, time.perf_counter() - started)

        if config.api_key and route != "/health" and request.method != "OPTIONS" and given != config.api_key:
            response = envelope(401, "unauthorized", "missing or wrong API key (X-API-Key or Bearer token)")
            response.headers[REQUEST_ID_HEADER] = audit.request_id
            record(response.status_code)
            return response
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", route)
            response = envelope(500, "internal_error", "internal error; see the server log")
            response.headers[REQUEST_ID_HEADER] = audit.request_id
            record(response.status_code)
            return response
        response.headers[REQUEST_ID_HEADER] = audit.request_id
        body, status = response.body_iterator, response.status_code

        async def recorded_at_the_end():  # a stream's latency is its whole length, not its headers'
            try:
                async for chunk in body:
                    yield chunk
            finally:
                record(status)

        response.body_iterator = recorded_at_the_end()
        return response

    def refused_by_size(scope: dict[str, Any], started: float) -> str:
        """The access and audit lines of a request BodyLimit refuses before the app sees it."""
        headers = Headers(scope=scope)
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        audit = RequestAudit(request_id(headers.get(REQUEST_ID_HEADER)), client_fingerprint(given or None))
        _record(state, access, scope["path"], scope["method"], 413, started)
        audit_trail.write(audit, scope["method"], scope["path"], 413, time.perf_counter() - started)
        return audit.request_id

    install_error_handlers(app)
    # added last: the outermost, before anything reads the body
    app.add_middleware(BodyLimit, limit=limit, on_refused=refused_by_size)
    app.include_router(routes.router)
    app.include_router(openai_chat.router)
    app.include_router(review.router)
    return app


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


def _record(state: ServerState, access: logging.Logger, route: str, method: str, status: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    state.metrics.record_http(route, status, elapsed)
    access.info("%s %s %d %.4f", method, route, status, elapsed)


def main(argv: list[str] | None = None) -> None:
    """Serve until stopped; exit with status 1 when the engine died (a supervisor restarts it)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The engine's loop shares the GIL with request threads (image decoding, the processor): hand
    # it over every 0.5 ms instead of every 5 ms, so the loop waits less to queue the next step.
    sys.setswitchinterval(0.0005)
    config = ServerConfig.from_env_and_args(argv)
    try:
        app = create_app(config)
    except ReviewKeyError as exc:
        raise SystemExit(f"error: {exc}") from None
    server = uvicorn.Server(uvicorn.Config(app, host=config.settings.api.host, port=config.settings.api.port,
                                           log_level="warning"))
    state: ServerState = app.state.medvl
    threading.Thread(target=_exit_when_the_engine_dies, args=(state, server), name="watchdog", daemon=True).start()
    server.run()
    if _dead(state):
        sys.exit(1)


def _dead(state: ServerState) -> bool:
    engine = state.served.engine
    return engine is not None and engine.dead is not None


def _exit_when_the_engine_dies(state: ServerState, server: Any) -> None:
    """A dead engine serves nothing again: /health answers 503 with the reason for
    ``api.dead_engine_exit_s`` (a probe or an operator sees why), then the server stops and the
    process exits non-zero, as vLLM's does, so Docker's restart policy or Kubernetes replaces it."""
    while not server.should_exit:
        if _dead(state):
            grace = state.settings.api.dead_engine_exit_s
            log.critical("the engine is dead; /health answers 503; exiting in %.0f s", grace)
            time.sleep(grace)
            server.should_exit = True
            return
        time.sleep(0.2)


if __name__ == "__main__":
    main()
