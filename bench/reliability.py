"""Reliability figures: fuzzing, hostile uploads, sustained load, crash-and-resume.

Each function measures one thing against the real server or the real pipeline and returns
plain numbers; ``bench/run_reliability.py`` runs them all and writes
benchmarks/reliability.json, and the tests assert on the same functions.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from medvl.core.workdir import REPO_ROOT
from medvl.pipeline.gates import PHASES

DOCUMENTED = {200, 400, 401, 404, 405, 413, 422, 503, 504}


def _is_envelope(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and {"status", "code", "message"} <= set(error)


def _still_serves(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- fuzzing


def fuzz_schema(base: str, max_examples: int) -> dict[str, Any]:
    """schemathesis cases generated from the server's own OpenAPI schema, all operations."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    statuses: Counter = Counter()
    problems: list[str] = []

    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy())
    def one(case):
        response = case.call(base_url=base, timeout=120)
        statuses[response.status_code] += 1
        if response.status_code >= 500 or response.status_code not in DOCUMENTED:
            problems.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]}")
        elif response.status_code >= 400 and not _is_envelope(response):
            problems.append(f"{case.method} {case.path} -> {response.status_code} without the error envelope")

    one()
    return {"cases": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500), "problems": problems[:20],
            "still_serves": _still_serves(base)}


# --------------------------------------------------------------------------- hostile uploads


def _png(image: Image.Image, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG file that decodes to width x height pixels (a decompression bomb)."""
    raw = zlib.compress(b"\x00" * (1 + width // 8) * 1, 9)  # one 1-bit row; IDAT is never reached
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def hostile_corpus() -> list[tuple[str, bytes, str, set[int]]]:
    """(name, bytes, content type, acceptable statuses). 200 is fine for odd-but-valid images."""
    rng = np.random.default_rng(0)
    page = Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    good_png, good_jpeg = _png(page), _jpeg(page)
    bad = {400}
    corpus: list[tuple[str, bytes, str, set[int]]] = [
        ("zero bytes", b"", "image/png", bad),
        ("text named .png", b"Metformin 500 mg BID\n" * 50, "image/png", bad),
        ("html named .jpg", b"<html><script>alert(1)</script></html>", "image/jpeg", bad),
        ("polyglot png+html", good_png + b"<html><body>hi</body></html>", "image/png", {200, 400}),
        ("polyglot zip in jpeg", good_jpeg + b"PK\x03\x04" + b"\x00" * 64, "image/jpeg", {200, 400}),
        ("decompression bomb 60000x60000", bomb_png(60000, 60000), "image/png", {413}),
        ("1x1 image", _png(Image.new("RGB", (1, 1), "white")), "image/png", {200}),
        ("30000x30000 image", bomb_png(30000, 30000), "image/png", {413}),
        ("1x500 strip", _png(Image.new("RGB", (1, 500), "white")), "image/png", bad),
        ("CMYK JPEG", _jpeg(page.convert("CMYK")), "image/jpeg", {200}),
        ("16-bit grayscale", _png(Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16))), "image/png", {200}),
        ("RGBA with alpha", _png(page.convert("RGBA")), "image/png", {200}),
        ("palette image", _png(page.convert("P")), "image/png", {200}),
        ("wrong content type", good_png, "application/x-msdownload", {200}),
        ("random bytes", rng.integers(0, 255, 4096, dtype=np.uint8).tobytes(), "image/png", bad),
    ]
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    corpus.append(("animated GIF", buffer.getvalue(), "image/gif", {200}))
    for cut in range(8, len(good_png), max(1, len(good_png) // 60)):
        corpus.append((f"truncated PNG at {cut} bytes", good_png[:cut], "image/png", bad))
    for cut in range(4, len(good_jpeg), max(1, len(good_jpeg) // 60)):
        # Pillow repairs some truncated JPEGs (LOAD_TRUNCATED_IMAGES off still decodes a prefix
        # for a few cut points): both a clean refusal and an answer are acceptable, a 5xx is not.
        corpus.append((f"truncated JPEG at {cut} bytes", good_jpeg[:cut], "image/jpeg", {200, 400}))
    return corpus


def hostile_requests(base: str, valid_png: bytes) -> list[tuple[str, Callable[[httpx.Client], httpx.Response], set[int]]]:
    """Non-file hostile requests: giant prompts, invalid UTF-8, missing/extra fields, bad base64."""
    data_url = "data:image/png;base64," + base64.b64encode(valid_png).decode()

    def chat(content: Any) -> dict[str, Any]:
        return {"model": "medvl", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}

    upload = {"file": ("p.png", valid_png, "image/png")}
    return [
        ("giant prompt", lambda c: c.post("/analyze", files=upload, data={"prompt": "x" * 200_000}), {400}),
        ("empty prompt", lambda c: c.post("/analyze", files=upload, data={"prompt": "   "}), {400}),
        ("invalid UTF-8 prompt", lambda c: c.post("/analyze", files={**upload, "prompt": (None, b"\xff\xfe\xfa", "text/plain")}),
         {200, 400, 422}),
        ("missing file", lambda c: c.post("/extract"), {422}),
        ("extra fields", lambda c: c.post("/extract", files={**upload, "junk": ("j", b"1", "text/plain")},
                                          data={"also": "ignored"}), {200}),
        ("JSON body to /extract", lambda c: c.post("/extract", json={"file": "abc"}), {422}),
        ("bad base64", lambda c: c.post("/v1/chat/completions", json=chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}])), {400}),
        ("base64 of text", lambda c: c.post("/v1/chat/completions", json=chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}])), {400}),
        ("remote image URL", lambda c: c.post("/v1/chat/completions", json=chat([{"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}])), {400}),
        ("two images", lambda c: c.post("/v1/chat/completions", json=chat([{"type": "image_url", "image_url": {"url": data_url}}] * 2)), {400}),
        ("no messages", lambda c: c.post("/v1/chat/completions", json={"model": "medvl", "messages": []}), {422}),
        ("wrong role", lambda c: c.post("/v1/chat/completions", json={"messages": [{"role": "root", "content": "hi"}]}), {422}),
        ("not JSON", lambda c: c.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}), {422}),
        ("max_tokens negative", lambda c: c.post("/v1/chat/completions", json={**chat("hi"), "max_tokens": -5}), {422}),
        ("text-only chat", lambda c: c.post("/v1/chat/completions", json=chat("Say hello.")), {200}),
        ("unknown route", lambda c: c.get("/admin"), {404}),
        ("wrong method", lambda c: c.get("/extract"), {405}),
    ]


def run_hostile(base: str) -> dict[str, Any]:
    """Send every hostile file and request; count statuses and anything undocumented."""
    results: list[dict[str, Any]] = []
    valid = _png(Image.new("RGB", (64, 64), "white"))
    with httpx.Client(base_url=base, timeout=120) as client:
        for name, data, content_type, allowed in hostile_corpus():
            for route in ("/extract", "/analyze"):
                response = client.post(route, files={"file": ("upload.png", data, content_type)})
                results.append(_judge(f"{route}: {name}", response, allowed))
        for name, call, allowed in hostile_requests(base, valid):
            results.append(_judge(name, call(client), allowed))
    failures = [r for r in results if not r["ok"]]
    return {"requests": len(results), "server_errors": sum(1 for r in results if r["status"] >= 500),
            "undocumented": len(failures), "failures": failures[:20],
            "statuses": dict(Counter(str(r["status"]) for r in results)), "still_serves": _still_serves(base)}


def _judge(name: str, response: httpx.Response, allowed: set[int]) -> dict[str, Any]:
    status = response.status_code
    ok = status in allowed and (status < 400 or _is_envelope(response))
    return {"name": name, "status": status, "ok": ok, "body": "" if ok else response.text[:200]}


# --------------------------------------------------------------------------- load


def server_rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def load_test(base: str, clients: int, seconds: float, image_png: bytes, server_pid: int | None = None,
              max_new_tokens: int = 8) -> dict[str, Any]:
    """``clients`` threads alternate /extract and /v1/chat/completions for ``seconds``."""
    data_url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    chat = {"model": "medvl", "max_tokens": max_new_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "List the medications."}]}]}
    latencies: dict[str, list[float]] = {"/extract": [], "/v1/chat/completions": []}
    counts = Counter()
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    memory_before = server_rss_mb(server_pid) if server_pid else None

    def worker(index: int) -> None:
        with httpx.Client(base_url=base, timeout=300) as client:
            turn = index
            while time.perf_counter() < deadline:
                route = "/extract" if turn % 2 == 0 else "/v1/chat/completions"
                turn += 1
                started = time.perf_counter()
                with lock:
                    counts["sent"] += 1
                try:
                    if route == "/extract":
                        response = client.post(route, files={"file": ("p.png", image_png, "image/png")})
                    else:
                        response = client.post(route, json=chat)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    counts["answered" if ok else "failed"] += 1
                    if ok:
                        latencies[route].append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_latencies = latencies["/extract"] + latencies["/v1/chat/completions"]

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    memory_after = server_rss_mb(server_pid) if server_pid else None
    return {
        "clients": clients, "duration_s": seconds, "sent": counts["sent"], "answered": counts["answered"],
        "failed": counts["failed"], "lost": counts["sent"] - counts["answered"] - counts["failed"],
        "requests_per_s": counts["answered"] / seconds,
        "latency_s": {"p50": pct(all_latencies, 50), "p95": pct(all_latencies, 95), "p99": pct(all_latencies, 99)},
        "by_route": {route: len(values) for route, values in latencies.items()},
        "server_rss_mb": {"before": memory_before, "after": memory_after,
                          "growth": (memory_after - memory_before) if server_pid else None},
    }


# --------------------------------------------------------------------------- crash and resume

# Overrides that keep phase 6 short enough to kill and resume many times on a CPU.
SHORT_TRAINING = ["--set", "train.max_steps=16", "--set", "train.save_steps=4", "--set", "train.eval_steps=100"]


def half_written_json(workdir: Path) -> list[str]:
    """Every JSON under benchmarks/ and datasets/ that does not parse (there must be none)."""
    broken = []
    for folder in (workdir / "benchmarks", workdir / "datasets"):
        for path in folder.rglob("*.json") if folder.is_dir() else []:
            if path.name.startswith("."):
                continue  # an atomic write's temporary file, never read by anything
            try:
                json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                broken.append(str(path.relative_to(workdir)))
    return broken


def kill_and_resume(workdir: Path, phase: int, kill_after_s: float, extra: list[str]) -> dict[str, Any]:
    """Kill phase ``phase`` with SIGKILL partway, then let run_pipeline.sh resume it."""
    (workdir / PHASES[phase].outputs[0]).unlink(missing_ok=True)  # unfinished, as a crash leaves it
    script = PHASES[phase].script_path
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "MEDVL_PYTHON": sys.executable}
    log = workdir / "logs" / f"phase{phase}.log"
    size_before = log.stat().st_size if log.is_file() else 0
    marker = f"phase {phase} (".encode()
    proc = subprocess.Popen([sys.executable, str(script), "--workdir", str(workdir), *extra], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.perf_counter()
    # Wait until the phase has really started (past its upstream checks), then a little more.
    while time.perf_counter() - started < 300 and proc.poll() is None:
        if log.is_file() and marker in log.read_bytes()[size_before:]:
            break
        time.sleep(0.05)
    time.sleep(kill_after_s)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    broken = half_written_json(workdir)
    resumed = subprocess.run([str(REPO_ROOT / "run_pipeline.sh"), "--workdir", str(workdir), "--to", str(phase),
                              *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return {"phase": phase, "killed": not finished_first, "killed_after_s": round(time.perf_counter() - started, 2),
            "half_written_json": broken,
            "resumed_at_phase": phase if f"First failing gate: phase {phase}." in resumed.stdout else None,
            "resume_exit_code": resumed.returncode, "half_written_after_resume": half_written_json(workdir),
            "resume_said": resumed.stdout.strip().splitlines()[:1],
            "ok": (not finished_first and not broken and resumed.returncode == 0
                   and f"First failing gate: phase {phase}." in resumed.stdout)}


# How long into each phase to kill it on the tiny profile (its work, not its imports): tiny's
# phase 2 builds its stand-in in about 0.4 s.
KILL_DELAY_S = {1: 2.0, 2: 0.1, 3: 1.0, 4: 1.5, 5: 4.0, 6: 6.0, 7: 10.0, 8: 3.0, 9: 0.0}


def crash_resume_all(workdir: Path, phases: list[int]) -> dict[str, Any]:
    """kill_and_resume for each phase, on a workdir where the pipeline already ran.

    Phase 6 goes last and with short-training overrides (a full CPU training run per kill
    would take minutes); every other phase is killed and resumed with the run's own settings,
    so each resume starts exactly at the killed phase.
    """
    ordered = sorted(phases, key=lambda phase: phase == 6)
    results = [kill_and_resume(workdir, phase, KILL_DELAY_S[phase], SHORT_TRAINING if phase == 6 else [])
               for phase in ordered]
    return {"phases": sorted(results, key=lambda r: r["phase"]), "all_ok": all(r["ok"] for r in results)}
