"""Request bodies held in memory and inside the upload limit: patient documents never reach the disk.

Why: Starlette spools a multipart part over 1 MB to a temporary file (a patient's page landed
in /tmp), and ``api.max_upload_mb`` was checked only after the whole body had arrived. Here:

- :class:`BodyLimit` (ASGI middleware, outermost) answers 413 from ``Content-Length`` before
  reading anything (with its access and audit lines and ``X-Request-ID``, through the server's
  callback), and while reading a body sent without it, as soon as it passes the limit;
- :func:`keep_uploads_in_memory` raises Starlette's spool threshold to that limit, so a part
  (which the limit keeps below it) stays in a memory buffer and is never rolled over to disk.

The body limit is the upload limit with room for how an image travels: base64 in a chat's data
URL (4/3 of the bytes) and the multipart or JSON framing around it; the decoded image is then
checked against ``api.max_upload_mb`` itself (``medvl.engine.images.decode_image``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from starlette.formparsers import MultiPartParser

FRAMING_BYTES = 1 << 20  # multipart headers, form fields, the chat's JSON around its data URL


def body_limit(max_upload_mb: float) -> int:
    """The largest request body accepted for uploads of ``max_upload_mb``."""
    return int(max_upload_mb * 2**20 * 4 / 3) + FRAMING_BYTES


def keep_uploads_in_memory(limit: int) -> None:
    """Parts up to ``limit`` bytes stay in memory (SpooledTemporaryFile rolls over only past it)."""
    MultiPartParser.spool_max_size = limit


class BodyLimit:
    """413 for a body over ``limit`` bytes: from its Content-Length at once, else while reading.

    Past the limit the app is told the client went away (``http.disconnect``: it stops reading,
    whichever layer reads), and whatever it answers to that is replaced by the 413."""

    def __init__(self, app: Any, limit: int, on_refused: Callable[[dict[str, Any], float], str] | None = None) -> None:
        self.app = app
        self.limit = limit
        # called for a 413 from Content-Length (the app never sees that request): writes its
        # access and audit lines, returns its request id for the X-Request-ID header
        self.on_refused = on_refused

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            started = time.perf_counter()
            await self._refuse(send, int(length), self.on_refused(scope, started) if self.on_refused else None)
            return
        received, over, refused = 0, False, False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal refused
            if not over:
                await send(message)
            elif message["type"] == "http.response.start" and not refused:
                refused = True
                await self._refuse(send, received)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not over:
                raise
        if over and not refused:
            await self._refuse(send, received)

    async def _refuse(self, send: Any, size: int, request_id: str | None = None) -> None:
        body = json.dumps({"error": {"status": 413, "code": "file_too_large", "param": None,
                                     "message": f"the request body is {size} bytes or more; the limit is {self.limit} "
                                                "bytes (api.max_upload_mb, with room for base64 and framing)"}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
