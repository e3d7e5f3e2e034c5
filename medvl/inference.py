"""Serving-side inference: image checks, one batching worker that owns the model, and
turning a model answer into the structured record.

The API and the command-line tools use this module, so an image rejected by one is
rejected by the other with the same message, and a structured result has one shape.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvl.benchmark import build_inputs
from medvl.decoding import StaticDecoder, fuse_projections, should_compile
from medvl.modeling import input_device, load_model, load_processor
from medvl.settings import Settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- image checks


class BadInput(ValueError):
    """The client sent something unusable; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.code = code


MAX_ASPECT_RATIO = 200


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB image, refusing empty, oversized, non-image, truncated and bomb inputs."""
    if not data:
        raise BadInput("the uploaded file is empty", 400, "empty_file")
    if len(data) > max_bytes:
        raise BadInput(f"the file is {len(data)} bytes; the limit is {max_bytes}", 413, "file_too_large")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise BadInput(f"the image is {width}x{height} = {width * height} pixels; the limit is "
                               f"{max_pixels}", 413, "image_too_large")
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                # Qwen2-VL's resizer refuses aspect ratios above 200; say so instead of failing later.
                raise BadInput(f"the image is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO}:1 "
                               "cannot be processed", 400, "bad_image")
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.seek(0)  # first frame of animated images
            img.load()
            return img.convert("RGB")
    except BadInput:
        raise
    except Image.DecompressionBombError as exc:
        raise BadInput(f"decompression bomb refused: {exc}", 413, "image_too_large") from None
    except Exception as exc:
        raise BadInput(f"not a readable image ({type(exc).__name__})", 400, "bad_image") from None


# --------------------------------------------------------------------------- structured output

STRUCTURED_KEYS = ("medications", "diagnoses", "procedures", "lab_values", "vitals")


def empty_structured() -> dict[str, Any]:
    return {"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}}


def _json_candidate(text: str) -> str | None:
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("{")
    if start < 0:
        return None
    return text[start:]


def repair_json(text: str) -> Any:
    """Best-effort repair of a model's almost-JSON: fences, trailing commas, unclosed brackets."""
    candidate = _json_candidate(text)
    if candidate is None:
        raise ValueError("no JSON object in the answer")
    candidate = re.sub(r",\s*([}\]])", r"\1", candidate)
    stack: list[str] = []
    in_string = escaped = False
    end = len(candidate)
    for i, ch in enumerate(candidate):
        if in_string:
            escaped = (ch == "\\") and not escaped
            if ch == '"' and not escaped:
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                end = i
                break
            stack.pop()
            if not stack:
                end = i + 1
                break
    body = candidate[:end] + ('"' if in_string else "")
    body = re.sub(r",\s*$", "", body) + "".join(reversed(stack))
    return json.loads(re.sub(r",\s*([}\]])", r"\1", body))


def normalize_structured(data: Any) -> dict[str, Any]:
    """Coerce a parsed answer into the documented shape (unknown keys dropped)."""
    out = empty_structured()
    if not isinstance(data, dict):
        raise ValueError("the JSON answer is not an object")
    for key in ("medications", "lab_values"):
        items = data.get(key) or []
        out[key] = [{k: str(v) for k, v in item.items()} for item in items if isinstance(item, dict)] \
            if isinstance(items, list) else []
    for key in ("diagnoses", "procedures"):
        items = data.get(key) or []
        out[key] = [str(i) for i in items if isinstance(i, (str, int, float))] if isinstance(items, list) else []
    vitals = data.get("vitals") or {}
    out["vitals"] = {str(k): str(v) for k, v in vitals.items()} if isinstance(vitals, dict) else {}
    return out


def lexicon_fallback(text: str) -> dict[str, Any]:
    """The documented last resort: drugs (with a following dose) and conditions found in plain text."""
    from medvl.documents import CONDITIONS, DRUGS

    out = empty_structured()
    for name, *_ in DRUGS:
        match = re.search(rf"\b{re.escape(name)}\b\s*(\d+(?:\.\d+)?\s?(?:mg|mcg|g|units))?", text, re.I)
        if match:
            out["medications"].append({"name": name, "dose": match.group(1) or "", "route": "", "frequency": ""})
    for full, abbr in CONDITIONS:
        for word in (full, abbr):
            if word and re.search(rf"\b{re.escape(word)}\b", text):
                out["diagnoses"].append(word)
                break
    return out


def parse_structured(text: str) -> tuple[dict[str, Any], str]:
    """Answer text -> (structured record, how it was obtained: json | repaired | fallback)."""
    candidate = _json_candidate(text)
    if candidate is not None:
        try:
            return normalize_structured(json.loads(candidate[: candidate.rfind("}") + 1])), "json"
        except (ValueError, json.JSONDecodeError):
            pass
        try:
            return normalize_structured(repair_json(text)), "repaired"
        except (ValueError, json.JSONDecodeError):
            pass
    return lexicon_fallback(text), "fallback"


def structured_result(text: str) -> dict[str, Any]:
    """What /extract and the CLI return for one answer: record, how it was parsed, flags."""
    from medvl import flags

    structured, status = parse_structured(text)
    return {"structured": structured, "parse_status": status, "flags": flags.check(structured),
            "disclaimer": flags.DISCLAIMER}


# --------------------------------------------------------------------------- the engine


@dataclass
class GenerationRequest:
    image: Image.Image | None
    prompt: str
    max_new_tokens: int
    messages: list[dict[str, Any]] | None = None  # a full chat, for the OpenAI route
    streamer: Any = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def solo(self) -> bool:
        """Streams and free-form chats run alone; plain (image, prompt) requests batch."""
        return self.streamer is not None or self.messages is not None


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    generated_tokens: int
    latency_s: float
    queue_s: float
    batch_size: int
    finish_reason: str


class InferenceEngine:
    """Loads the model once, then one worker thread serves every request.

    Requests wait in a queue; the worker takes the first, then every other request already
    waiting (up to ``max_batch_size``), and generates them as one left-padded batch.
    Streaming requests and free-form chats run alone (tokens flow as they are produced).
    """

    def __init__(self, model_dir: Path, settings: Settings, max_batch_size: int = 8, int4: bool = False) -> None:
        self.model_dir = model_dir
        self.settings = settings
        self.max_batch_size = max_batch_size
        self.int4 = int4  # quantize to torchao int4 at load (GPU serving of a bf16 checkpoint)
        self.model: Any = None
        self.processor: Any = None
        self.decoder: StaticDecoder | None = None
        self.startup_s: dict[str, float] = {}  # load, quantize, warm-up (compilation): paid once per start
        self.error: str | None = None
        self.ready = threading.Event()
        self.queue: queue.Queue[GenerationRequest] = queue.Queue()
        self.tokens_generated = 0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> None:
        """Load in the background; the worker starts serving once the model is ready."""
        self._worker = threading.Thread(target=self._run, name="inference-worker", daemon=True)
        self._worker.start()

    def load(self) -> None:
        """Load, quantize if asked, and compile the decoding step, all before accepting traffic."""
        started = time.perf_counter()
        # The pixel budget saved with the model: the one it was trained with.
        self.processor = load_processor(self.model_dir, None, padding_side="left")
        self.model = load_model(self.model_dir, self.settings)
        self.startup_s["load"] = time.perf_counter() - started
        if self.int4:
            from medvl.quantize import int4_weight_only

            started = time.perf_counter()
            fuse_projections(self.model)  # before quantizing: the decoder's fused matmuls get int4 weights
            int4_weight_only(self.model)
            self.startup_s["quantize_int4"] = time.perf_counter() - started
        decode = self.settings.decode
        if decode.static_cache:
            started = time.perf_counter()
            self.decoder = StaticDecoder(self.model, decode.max_cache_len, should_compile(decode.compile, self.model),
                                         batch_sizes=tuple(sorted({1, self.max_batch_size})))
            blank = build_inputs(self.processor, [Image.new("RGB", (448, 448), "white")], ["Warm-up."],
                                 input_device(self.model))
            self.decoder.warm_up(blank)
            self.startup_s["decoder_warm_up"] = time.perf_counter() - started
        self.ready.set()
        log.info("model ready: %s (%s; start-up %s)", self.model_dir, self.decoding,
                 {k: round(v, 1) for k, v in self.startup_s.items()})

    @property
    def decoding(self) -> str:
        """How answers are generated, in words (for /health and logs)."""
        if self.decoder is None:
            return "plain generate"
        return self.decoder.description + (", int4 (torchao)" if self.int4 else "")

    def stop(self) -> None:
        self._stop.set()

    @property
    def device(self) -> str:
        return str(input_device(self.model)) if self.model is not None else "unloaded"

    # ---- requests
    def submit(self, request: GenerationRequest) -> Future:
        self.queue.put(request)
        return request.future

    def queue_depth(self) -> int:
        return self.queue.qsize()

    # ---- the worker
    def _run(self) -> None:
        try:
            self.load()
        except Exception as exc:  # reported by /health; the server stays up to say so
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while not first.solo and len(batch) < self.max_batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except queue.Empty:
                    break
                if nxt.solo:
                    self.queue.put(nxt)  # runs alone on a later turn
                    break
                batch.append(nxt)
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if live:
                self._generate(live)

    def _generate(self, batch: list[GenerationRequest]) -> None:
        started = time.perf_counter()
        try:
            inputs = self._inputs(batch)
            max_new = max(r.max_new_tokens for r in batch)
            answers = self._answers(inputs, max_new, batch[0].streamer)
            eos = set(self.model.generation_config.eos_token_id or [])
            for i, request in enumerate(batch):
                ids = [t for t in answers[i][: request.max_new_tokens] if t != self.processor.tokenizer.pad_token_id]
                finish = "stop" if ids and ids[-1] in eos else "length"
                text = self.processor.decode(ids, skip_special_tokens=True)
                self.tokens_generated += len(ids)
                request.future.set_result(GenerationResult(
                    text=text, prompt_tokens=int(inputs["attention_mask"][i].sum()), generated_tokens=len(ids),
                    latency_s=time.perf_counter() - request.enqueued, queue_s=started - request.enqueued,
                    batch_size=len(batch), finish_reason=finish))
        except Exception as exc:
            log.exception("generation failed for a batch of %d", len(batch))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            if batch[0].streamer is not None:
                batch[0].streamer.end()

    def _answers(self, inputs: Any, max_new: int, streamer: Any) -> list[list[int]]:
        """New token ids per row: the static-cache decoder when the request fits its cache,
        plain generate otherwise (both greedy, same tokens)."""
        width = inputs["input_ids"].shape[1]
        if self.decoder is not None and self.decoder.fits(width, max_new):
            return self.decoder.generate(inputs, max_new, streamer=streamer).sequences
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": False}
        if streamer is not None:
            kwargs["streamer"] = streamer
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return out[:, width:].tolist()

    def _inputs(self, batch: list[GenerationRequest]) -> Any:
        if all(r.messages is None for r in batch):
            return build_inputs(self.processor, [r.image for r in batch], [r.prompt for r in batch],
                                input_device(self.model))
        (request,) = batch  # chats are solo
        text = self.processor.apply_chat_template(request.messages, add_generation_prompt=True)
        images = [request.image] if request.image is not None else None
        return self.processor(text=[text], images=images, return_tensors="pt").to(input_device(self.model))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raise with the load error if it failed."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.ready.wait(0.2):
            if self.error:
                raise RuntimeError(f"the model failed to load: {self.error}")
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"model not loaded after {timeout} s")

    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int, timeout: float | None = None) -> GenerationResult:
        """Blocking convenience for the CLI and tests: submit and wait."""
        return self.submit(GenerationRequest(image, prompt, max_new_tokens)).result(timeout=timeout)
