"""Start the real server in a subprocess and check every endpoint against it.

Phase 8 and the API tests use the same code, so what the pipeline reports as validated is
exactly what the tests assert.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from medvl.core.workdir import REPO_ROOT
from medvl.medical.records import is_valid_record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(workdir: Path, profile: str = "tiny", extra_args: list[str] | None = None,
                   env: dict[str, str] | None = None, ready_timeout_s: float = 300.0,
                   timing: dict[str, float] | None = None):
    """Yield the base URL of a server started on a free loopback port; stop it afterwards.
    ``timing``, if given, receives ``ready_s``: process start to the first /health 200."""
    port = free_port()
    log_path = workdir / "logs" / "api_server_stdout.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "medvl.http.server", "--workdir", str(workdir), "--profile", profile,
           "--port", str(port), *(extra_args or [])]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        ready_s = wait_ready(base, proc, ready_timeout_s, log_path)
        if timing is not None:
            timing["ready_s"] = ready_s
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float, log_path: Path) -> float:
    """Poll /health until 200; returns seconds waited. Fails early if the process died."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server not ready after {timeout_s} s")


def png_of(path: Path) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _call(client: httpx.Client, method: str, url: str, expect: int, check, **kwargs) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        response = client.request(method, url, **kwargs)
        latency = time.perf_counter() - started
        ok = response.status_code == expect
        detail = check(response) if ok and check else None
        if detail is False:
            ok = False
        return {"status": response.status_code, "expected": expect, "ok": ok, "latency_s": latency,
                "detail": response.text[:300] if not ok else (detail if isinstance(detail, str) else None)}
    except httpx.HTTPError as exc:
        return {"status": None, "expected": expect, "ok": False, "latency_s": time.perf_counter() - started,
                "detail": f"{type(exc).__name__}: {exc}"}


def extract_every_page(client: httpx.Client, pages: list[Path]) -> dict[str, Any]:
    """/extract on every page: each answer must be JSON valid against the record's schema."""
    started = time.perf_counter()
    valid, statuses = 0, []
    for page in pages:
        response = client.post("/extract", files={"file": (page.name, png_of(page), "image/png")})
        statuses.append(response.status_code)
        valid += response.status_code == 200 and is_valid_record(response.json()["raw_text"])
    ok = valid == len(pages) > 0
    return {"status": 200 if set(statuses) == {200} else max(statuses, default=None), "expected": 200, "ok": ok,
            "latency_s": time.perf_counter() - started, "detail": f"{valid}/{len(pages)} answers valid against the schema"}


def validate(base: str, pages: list[Path], api_key: str | None = None) -> dict[str, Any]:
    """Every endpoint, its happy path (on the first page) and a bad input each, and /extract on
    every page; returns per-endpoint results."""
    headers = {"X-API-Key": api_key} if api_key else {}
    image = png_of(pages[0])
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    chat = {"model": "medvl", "max_tokens": 16, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "List the medications."}]}]}

    def has(*keys):
        return lambda r: all(k in r.json() for k in keys)

    def streamed(r):
        lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
        return lines[-1] == "data: [DONE]" and json.loads(lines[1][6:])["object"] == "chat.completion.chunk"

    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        checks = {
            # detail: the served model's path, recorded by phase 8
            "GET /health": _call(client, "GET", "/health", 200,
                                 lambda r: r.json()["model_path"] if r.json()["model_loaded"] else False),
            "POST /extract": _call(client, "POST", "/extract", 200, has("structured", "raw_text", "latency_s"),
                                   files={"file": ("doc.png", image, "image/png")}),
            "POST /analyze": _call(client, "POST", "/analyze", 200, has("text", "usage"),
                                   files={"file": ("doc.png", image, "image/png")},
                                   data={"prompt": "Summarise this document."}),
            "POST /v1/chat/completions": _call(client, "POST", "/v1/chat/completions", 200,
                                               lambda r: r.json()["object"] == "chat.completion", json=chat),
            "POST /v1/chat/completions (stream)": _call(client, "POST", "/v1/chat/completions", 200, streamed,
                                                        json={**chat, "stream": True}),
            "GET /benchmark": _call(client, "GET", "/benchmark", 200, lambda r: isinstance(r.json(), dict)),
            "GET /metrics": _call(client, "GET", "/metrics", 200, lambda r: "medvl_requests_total" in r.text),
            "POST /extract (every page: JSON valid against the record schema)": extract_every_page(client, pages),
            "POST /extract (empty file -> 400)": _call(client, "POST", "/extract", 400,
                                                       lambda r: r.json()["error"]["code"] == "empty_file",
                                                       files={"file": ("x.png", b"", "image/png")}),
            "POST /extract (missing file -> 422)": _call(client, "POST", "/extract", 422,
                                                         lambda r: "error" in r.json()),
        }
    return checks
