"""The audit trail: one JSON line per request in ``logs/audit.jsonl``, with no patient data.

HIPAA's Security Rule makes audit controls a required standard (45 CFR 164.312(b)): who asked,
about which document, which model answered, when and with what outcome. A line holds the time,
the request id (also the response's ``X-Request-ID``; a client's own id is kept when it sends a
well-formed one), the client as a fingerprint of its API key (never the key), method and route,
the document's SHA-256 and page count (never its bytes), the model folder, its served form and
the served settings' hash, the status, the latency and the token counts. Never prompts, images,
answers or extracted values (a review line names the document, the pointers decided, the
actions and who; never a value): the access log (``logs/api.log``) and this file are grepped for
every value of a test document in ``tests/test_api.py``. The file rotates by size
(``api.audit_max_mb``, ``api.audit_backups``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept only if it is short and plain: it goes into a log line and a header.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id(sent: str | None) -> str:
    """The client's ``X-Request-ID`` when well formed, else a fresh one."""
    return sent if sent and _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex


def client_fingerprint(api_key: str | None) -> str:
    """Who called, without the secret: the first 16 hex digits of the key's SHA-256."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else "anonymous"


@dataclass
class RequestAudit:
    """What a route learns about its request, for the audit line (``request.state.audit``)."""

    request_id: str
    client: str
    document_sha256: str | None = None
    pages: int | None = None
    tokens: dict[str, int] = field(default_factory=dict)
    # the review routes: the document, the pointers decided and the actions, never a value
    review: dict[str, Any] | None = None

    def document(self, data: bytes, pages: int | None = None) -> None:
        """The document's hash at once; its page count when known (a PDF's once it is read)."""
        self.document_sha256 = hashlib.sha256(data).hexdigest()
        self.pages = pages


class AuditTrail:
    """Appends one JSON line per request to ``path``, rotating past ``max_mb``."""

    def __init__(self, path: Path, max_mb: float, backups: int, model: dict[str, str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._logger = logging.getLogger(f"medvl.audit.{path}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        if not self._logger.handlers:
            handler = RotatingFileHandler(path, maxBytes=int(max_mb * 2**20), backupCount=backups,
                                          encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)
        self.model = model  # path, form, settings_hash: fixed for the server's life

    def write(self, audit: RequestAudit, method: str, route: str, status: int, latency_s: float) -> None:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": audit.request_id,
            "client": audit.client, "method": method, "route": route, "status": status,
            "latency_s": round(latency_s, 4), "document_sha256": audit.document_sha256, "pages": audit.pages,
            **self.model, "tokens": audit.tokens or None}
        if audit.review is not None:
            line["review"] = audit.review
        self._logger.info(json.dumps(line, separators=(",", ":")))
