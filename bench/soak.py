#!/usr/bin/env python3
"""Soak test: the real server under a randomized mix of traffic, every request's status checked.

    python bench/soak.py [--workdir WD] [--seconds 600] [--clients 8] [--out soak.json]

Starts the API (``medvl.http.validate.running_server``: the run's model in WD, tiny by default) with
a small waiting queue, then ``--clients`` threads send, until ``--seconds`` have passed, a
random mix of: /extract pages, text-only and page chats with ``max_tokens`` from 1 up to exactly
the context left (and some over it), streamed and not, sampled and greedy; requests cancelled
by a client that hangs up mid-stream or times out; and bursts of simultaneous requests past
``decode.max_waiting``. A separate thread polls /health every second.

Every request must end with the status its kind allows: 200; 400 ``context_length_exceeded``
only for a request sent over the context; 503 ``overloaded`` with ``Retry-After`` only when the
queue is full; a stream must end with ``data: [DONE]`` and no error event. Any other status, any
5xx, a request that hangs past its client timeout, or a /health answer other than 200 is an
error. Writes the counts and errors as JSON; exits 1 on any error. CI runs a short form
(``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from medvl.core.io import atomic_write_json
from medvl.core.settings import load_settings
from medvl.core.workdir import REPO_ROOT
from medvl.http.validate import running_server
from medvl.medical.documents import benchmark_documents, render_document

CLIENT_TIMEOUT_S = 180.0  # a request still unanswered after this has hung


def pages(count: int = 3) -> list[bytes]:
    """Rendered synthetic pages (PNG bytes), different kinds."""
    out = []
    for doc in benchmark_documents(4321, count):
        buffer = io.BytesIO()
        render_document(doc).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


class Soak:
    """The traffic mix and its tally."""

    def __init__(self, base: str, context: int, page_bytes: list[bytes], seed: int) -> None:
        self.base = base
        self.context = context
        self.pages = page_bytes
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.errors: list[str] = []
        self.prompt_tokens: dict[str, int] = {}  # a chat's prompt length, learnt from its first answer

    def record(self, kind: str, outcome: str, error: str | None = None) -> None:
        with self.lock:
            self.outcomes[f"{kind}: {outcome}"] += 1
            if error is not None:
                self.errors.append(f"{kind}: {error}"[:400])

    # ---- request kinds
    def extract(self, client: httpx.Client) -> None:
        r = client.post("/extract", files={"file": ("p.png", self.rng.choice(self.pages), "image/png")})
        self.check("extract", r, over=False)

    def chat(self, client: httpx.Client, rng: random.Random) -> None:
        with_page = rng.random() < 0.4
        text = rng.choice(["List the medications.", "Summarize the document.", "Write a long discharge note."])
        content: Any = text
        if with_page:
            url = "data:image/png;base64," + base64.b64encode(rng.choice(self.pages)).decode()
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
        key = f"{with_page}:{text}"
        known = self.prompt_tokens.get(key)
        roll = rng.random()
        if known is None or roll < 0.5:
            max_tokens = rng.choice([1, 8, 32, 64])
        elif roll < 0.8:
            max_tokens = self.context - known  # exactly the context left
        else:
            max_tokens = self.context - known + rng.randint(1, 50)  # over it: a 400
        over = known is not None and known + max_tokens > self.context
        body: dict[str, Any] = {"model": "medvl", "messages": [{"role": "user", "content": content}],
                                "max_tokens": max_tokens, "ignore_eos": rng.random() < 0.5}
        if rng.random() < 0.3:
            body |= {"temperature": 0.8, "seed": rng.randint(0, 1000)}
        kind = "chat+page" if with_page else "chat"
        if rng.random() < 0.5:
            self.stream(client, body, kind, over, hang_up=rng.random() < 0.15)
            return
        r = client.post("/v1/chat/completions", json=body)
        self.check(kind, r, over)
        if r.status_code == 200:
            self.prompt_tokens[key] = r.json()["usage"]["prompt_tokens"]

    def stream(self, client: httpx.Client, body: dict[str, Any], kind: str, over: bool, hang_up: bool) -> None:
        kind += " stream"
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                self.check(kind, r, over)
                return
            if over:
                self.record(kind, "200 over the context", "a stream over the context was accepted")
                return
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if hang_up and '"content"' in line:
                    self.record(kind, "hung up")  # closing here cancels the request on the server
                    return
            events = [line for line in lines if line.startswith("data: ")]
            if events[-1:] != ["data: [DONE]"] or any(e.startswith('data: {"error"') for e in events):
                self.record(kind, "bad stream", f"stream ended without [DONE] or with an error: {events[-2:]}")
                return
            self.record(kind, "200")

    def burst(self) -> None:
        """Simultaneous short chats, more than the waiting queue holds: 200 or 503 each."""
        def one(_: int) -> None:
            with httpx.Client(base_url=self.base, timeout=CLIENT_TIMEOUT_S) as client:
                r = client.post("/v1/chat/completions", json={
                    "model": "medvl", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello"}]})
                self.check("burst", r, over=False)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # ---- checking
    def check(self, kind: str, r: httpx.Response, over: bool) -> None:
        code = r.status_code
        try:
            error = (r.json().get("error") or {}) if code != 200 else {}
        except ValueError:
            error = {"code": "not JSON"}
        if code == 200 and not over:
            self.record(kind, "200")
        elif code == 400 and over and error.get("code") == "context_length_exceeded":
            self.record(kind, "400 over the context")
        elif code == 503 and error.get("code") == "overloaded" and r.headers.get("retry-after"):
            self.record(kind, "503 overloaded")
        else:
            self.record(kind, str(code), f"{code} {error or r.text[:200]} (over the context: {over})")

    def client_loop(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.base, timeout=CLIENT_TIMEOUT_S) as client:
            while time.monotonic() < deadline:
                try:
                    roll = rng.random()
                    if roll < 0.3:
                        self.extract(client)
                    elif roll < 0.97:
                        self.chat(client, rng)
                    else:
                        self.burst()
                except httpx.TimeoutException:
                    self.record("client", "timeout", f"no answer within {CLIENT_TIMEOUT_S:.0f} s (hung)")
                except httpx.HTTPError as exc:
                    self.record("client", type(exc).__name__, f"{type(exc).__name__}: {exc}")


def health_loop(base: str, stop: threading.Event, soak: Soak) -> None:
    while not stop.wait(1.0):
        try:
            status = httpx.get(f"{base}/health", timeout=10).status_code
        except httpx.HTTPError as exc:
            soak.record("health", "unreachable", f"{type(exc).__name__}: {exc}")
            continue
        soak.record("health", str(status), None if status == 200 else f"/health answered {status}")


def run(base: str, context: int, seconds: float, clients: int, seed: int) -> dict[str, Any]:
    soak = Soak(base, context, pages(), seed)
    stop = threading.Event()
    checker = threading.Thread(target=health_loop, args=(base, stop, soak), daemon=True)
    checker.start()
    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=soak.client_loop, args=(deadline, seed + i)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    checker.join()
    requests = sum(v for k, v in soak.outcomes.items() if not k.startswith("health"))
    return {"seconds": time.monotonic() - started, "clients": clients, "seed": seed, "requests": requests,
            "outcomes": dict(sorted(soak.outcomes.items())), "errors": len(soak.errors),
            "error_examples": soak.errors[:20]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(REPO_ROOT), help="the run whose model the server loads")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=8, help="decode.max_waiting: small, so bursts overload it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = parser.parse_args(argv)
    settings = load_settings(args.profile)
    extra = ["--set", f"decode.max_waiting={args.max_waiting}", "--max-new-tokens", "64"]
    with running_server(Path(args.workdir), args.profile, extra_args=extra) as base:
        result = run(base, settings.decode.max_cache_len, args.seconds, args.clients, args.seed)
    result["command"] = " ".join(["python bench/soak.py", *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        atomic_write_json(args.out, result)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
