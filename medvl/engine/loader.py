"""A served model: load it, build the engine, compile the decoding steps, then take traffic.

The API (and ``bench/perf_serving.py``, the CLI) start one :class:`ServedModel`. Loading
runs in a background thread so that the server can answer ``/health`` (503, loading) at once;
everything slow (weights, int4 packing, compiling a CUDA graph per batch bucket) happens
before :attr:`ready` is set, never inside a request.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from PIL import Image

from medvl.core.settings import DecodeSettings, Settings
from medvl.core.workdir import Workdir
from medvl.engine.compile_cache import compile_cache_dir, use_compile_cache
from medvl.engine.grammar import RECORD_FORMAT
from medvl.engine.scheduler import Engine, EngineMetrics
from medvl.engine.slot_cache import SlotDecoder, should_compile
from medvl.medical import ocr
from medvl.model.forms import FORMS, FormError, choose, load_in_form
from medvl.model.loading import input_device, load_processor

log = logging.getLogger(__name__)


def build_engine(model: Any, processor: Any, decode: DecodeSettings, slots: int | None = None,
                 metrics: EngineMetrics | None = None, compile_step: bool | None = None) -> Engine:
    """The engine over a loaded model, per the ``decode`` settings (``slots`` overrides
    ``decode.max_batch_size``; ``compile_step`` overrides ``decode.compile``)."""
    compiled = should_compile(decode.compile, model) if compile_step is None else compile_step
    decoder = SlotDecoder(model, decode.max_cache_len, slots or decode.max_batch_size, compiled,
                          chunk_tokens=decode.max_prefill_tokens)
    return Engine(model, processor, decoder, decode.max_waiting, decode.max_prefill_tokens, metrics,
                  vision_in_prepare=decode.vision_in_prepare)


def warm_up(engine: Engine, image: Image.Image | None = None, prompt: str = "Warm-up.") -> dict[int, float]:
    """Compile and capture every batch bucket's step on a page (a blank one by default), and
    compile the record's grammar (/extract's); returns seconds per bucket."""
    blank = engine.prepare(image or Image.new("RGB", (448, 448), "white"), prompt)
    if blank.ready is not None:  # its image embeddings, made on the vision stream
        blank.ready.synchronize()
    engine.grammars.compile(RECORD_FORMAT)
    return engine.decoder.warm_up(engine.decoder.prompt_row(blank.tensors))


class Served:
    """What the server serves, loaded in a background thread so that /health answers (503,
    loading) at once; :attr:`ready` once it serves, :attr:`error` if loading failed."""

    engine: Engine | None = None

    def __init__(self) -> None:
        self.startup_s: dict[str, float] = {}  # what starting cost, once per start (load, warm-up ...)
        self.error: str | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._load_and_serve, name="loader", daemon=True).start()

    def _load_and_serve(self) -> None:
        try:
            self.load()
        except Exception as exc:  # reported by /health; the server stays up to say so
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("failed to load")
            return
        if self.engine is not None:
            self.engine.start()
        self.ready.set()

    def load(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


class ServedModel(Served):
    """The model the API serves: weights (int4 packing included), then the engine, its decoding
    steps compiled; :attr:`engine` once :attr:`ready`."""

    def __init__(self, model_dir: Path, settings: Settings, form: str = "bf16", slots: int | None = None,
                 metrics: EngineMetrics | None = None) -> None:
        super().__init__()
        self.model_dir = model_dir
        self.settings = settings
        self.form = form  # how the weights are served (medvl.model.forms.FORMS)
        self.slots = slots
        self.metrics = metrics

    def load(self) -> None:
        started = time.perf_counter()
        ocr.use_backend(self.settings.api.ocr_backend)
        if self.settings.data.ocr_grounded_prompt:
            ocr.load()  # every prompt needs the page's OCR text: fail at start, not per request
        pool = None
        if self.settings.api.source_boxes or self.settings.data.ocr_grounded_prompt:
            try:  # /extract reads each page (boxes, grounding): the readers ready before traffic
                ocr.warm_up()
                pool = ocr.use_pool(ocr.serving_workers(self.settings.api.ocr_workers), wait=False)
            except ocr.OcrUnavailable as exc:  # the records still come, without boxes (logged per request)
                log.warning("source boxes unavailable: %s", exc)
        # The pixel budget saved with the model: the one it was trained with.
        processor = load_processor(self.model_dir, None, padding_side="left")
        model = load_in_form(self.model_dir, self.settings, self.form)
        self.startup_s["load"] = time.perf_counter() - started
        started = time.perf_counter()
        self.engine = build_engine(model, processor, self.settings.decode, self.slots, self.metrics)
        warm_up(self.engine)
        self.startup_s["decoder_warm_up"] = time.perf_counter() - started
        if pool is not None:  # its workers started beside the load and the compilation
            started = time.perf_counter()
            pool.wait_warm()
            self.startup_s["ocr_workers_after_decoder"] = time.perf_counter() - started
        log.info("model ready: %s (%s; start-up %s)", self.model_dir, self.decoding,
                 {k: round(v, 1) for k, v in self.startup_s.items()})

    def prompt_for(self, image: Image.Image, instruction: str) -> str:
        """What the model is asked about a page: the instruction, with the page's OCR text
        before it when the profile grounds prompts (data.ocr_grounded_prompt), as in training."""
        return ocr.grounded_prompt(image, instruction) if self.settings.data.ocr_grounded_prompt else instruction

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """Block until the engine serves; raise with the load error if loading failed."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not self.ready.wait(0.2):
            if self.error:
                raise RuntimeError(f"the model failed to load: {self.error}")
            if deadline is not None and time.perf_counter() > deadline:
                raise TimeoutError(f"model not loaded after {timeout} s")
        return self.engine

    @property
    def decoding(self) -> str:
        """How answers are generated, in words (for /health and logs)."""
        if self.engine is None:
            return ""
        return f"{self.engine.decoder.description}, weights {FORMS[self.form]}"

    @property
    def device(self) -> str:
        return str(input_device(self.engine.model)) if self.engine is not None else "unloaded"


OCR_MODEL = "ocr"  # --model ocr (server and CLI): the OCR + rules baseline instead of a model


def open_served(settings: Settings, wd: Workdir, model: str = "best", weights: str = "auto",
                slots: int | None = None, metrics: EngineMetrics | None = None) -> tuple[Served, str]:
    """What the server and the CLI serve for ``--model`` and ``--weights``, and its kind: the OCR
    + rules baseline for ``ocr``, else the model :func:`medvl.model.forms.choose` picks (as phases 7
    and 8 do): best, base, finetuned or a folder, in the form ``weights`` names (``auto``: the
    profile's form, the one phase 7 evaluated, or a folder's own form). Not loaded yet.

    Raises :class:`medvl.model.forms.FormError` when the model or form cannot be served.
    """
    if model == OCR_MODEL:
        if weights != "auto":
            raise FormError(f"--weights {weights}: the OCR baseline has no weights to choose")
        return ServedOcr(settings.api.ocr_backend, settings.api.ocr_workers), OCR_MODEL
    folder, kind, form = choose(settings, wd, weights, model)
    use_compile_cache(compile_cache_dir(settings, wd))  # a restart reuses the decoding steps compiled before
    return ServedModel(folder, settings, form, slots, metrics), kind


class ServedOcr(Served):
    """The OCR + rules baseline served in a model's place (``--model ocr``): /extract only, so
    users can compare it with the model on their own documents. It starts like a model (its
    OCR networks load in the background) so that /health reads both alike."""

    form = "ocr"
    model_dir = "ocr"

    def __init__(self, ocr_backend: str = "auto", ocr_workers: int = -1) -> None:
        super().__init__()
        self.ocr_backend = ocr_backend  # api.ocr_backend
        self.ocr_workers = ocr_workers  # api.ocr_workers
        self.device = "cpu"

    def load(self) -> None:
        """Load the OCR engine and its reading pool (raises
        :class:`medvl.medical.ocr.OcrUnavailable` when it cannot run)."""
        started = time.perf_counter()
        ocr.use_backend(self.ocr_backend)
        ocr.load()
        ocr.use_pool(ocr.serving_workers(self.ocr_workers))
        self.device = ocr.device()
        self.startup_s["load"] = time.perf_counter() - started

    @property
    def decoding(self) -> str:
        return ocr.describe() if self.ready.is_set() else ""
