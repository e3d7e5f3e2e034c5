"""The bar a fine-tuned VLM must clear: classical OCR plus rules, mapped to the extraction record.

OCR is rapidocr-onnxruntime: PP-OCR detection and recognition models shipped inside its wheel,
run by ONNX Runtime on the CPU (or by PyTorch on a GPU: api.ocr_backend, medvl/medical/ocr_torch.py),
nothing downloaded at run time (measured here: 1-2 s per
phase-3 page on a 2-core CPU; a plain search of its text found 40 of 43 expected terms).
Its lines go through rules built from the project's lexicon (the drug, condition, procedure
and analyte tables the documents are written from): a drug name with the dose, route and
frequency after it, an analyte with its value, unit, H/L flag and reference range, the
vitals by their labels. PP-OCR often drops the spaces between words ("Metformin500mgPO"),
so the rules allow none. The record gets the same plausibility flags as a model's answer.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from medvl.core.settings import OCR_BACKENDS
from medvl.medical.lexicon import CONDITIONS, DRUGS, LABS, PROCEDURES, RADIOLOGY
from medvl.medical.prompts import ocr_grounded
from medvl.medical.records import empty_structured

log = logging.getLogger(__name__)

_NUMBER = r"\d+(?:\.\d+)?"
_DOSE = rf"{_NUMBER}\s?(?:mg|mcg|g|units|mL)"
_ROUTES = sorted({route for _, _, route, _ in DRUGS}, key=len, reverse=True)
_FREQUENCIES = sorted({f for _, _, _, freqs in DRUGS for f in freqs}, key=len, reverse=True)
_VITALS = {  # record key -> (label, value pattern, how the documents write the value)
    "blood_pressure": ("BP", r"\d{2,3}/\d{2,3}", "{} mmHg"),
    "heart_rate": ("HR", r"\d{2,3}", "{} bpm"),
    "temperature": ("Temp", r"\d{2}(?:\.\d)?", "{} C"),
    "respiratory_rate": ("RR", r"\d{1,2}", "{} /min"),
    "spo2": ("Sp[O0]2", r"\d{2,3}%\s*on\s*(?:RA|\d\s*L\s*NC)", "{}"),  # OCR reads the O as a zero too
}


class OcrUnavailable(RuntimeError):
    """The OCR engine cannot run here; the message says why."""


# ONNX Runtime threads per page: None lets it take every core (the server, one page at a time);
# a worker process of phase 5 takes one (:func:`use_threads`), so that 16 workers share 16 cores.
_THREADS: int | None = None
# Which runtime runs PP-OCR's networks (api.ocr_backend): "onnxruntime" (the CPU), "torch"
# (PyTorch via onnx2torch, on the GPU when there is one: medvl/medical/ocr_torch.py), or "auto"
# (torch when a GPU is visible, else onnxruntime).
_BACKEND = "auto"


def use_backend(backend: str) -> None:
    """Run PP-OCR's networks with ``backend`` (one of :data:`OCR_BACKENDS`) from now on."""
    global _BACKEND
    if backend not in OCR_BACKENDS:
        raise ValueError(f"OCR backend {backend!r}: expected one of {', '.join(OCR_BACKENDS)}")
    _BACKEND = backend
    load.cache_clear()


def backend() -> str:
    """The runtime the engine uses: "auto" resolved."""
    if _BACKEND != "auto":
        return _BACKEND
    import torch

    return "torch" if torch.cuda.is_available() else "onnxruntime"


def device() -> str:
    """Where the networks run: "cpu" for ONNX Runtime; for torch, the GPU when one is visible."""
    if backend() != "torch":
        return "cpu"
    from medvl.medical.ocr_torch import device_for_ocr

    return device_for_ocr().type


def use_threads(count: int, backend: str = "onnxruntime") -> None:
    """Read pages with ``backend`` and ``count`` ONNX Runtime, OpenCV and torch threads from now
    on (a phase-5 worker's initializer): 16 workers on 16 cores each took 4 s a page with
    OpenCV's default pool of a thread per core (phase 5 on an H100 host: 1,500 pages in 376 s).
    ``backend`` is the one the server resolves (:func:`backend`), so that training pages are read
    as served pages are: "torch" workers share the GPU for the networks and keep the CPU for
    rapidocr's pre- and post-processing (52 ms of a page's 1.18 s on this project's 2-core CPU)."""
    global _THREADS, _BACKEND
    _THREADS = count
    _BACKEND = backend
    try:
        import cv2

        cv2.setNumThreads(count)
    except ImportError:  # rapidocr brings OpenCV; without it load() says why
        pass
    if backend == "torch":
        import torch

        torch.set_num_threads(count)
    load.cache_clear()


# Raised whenever this module reads a page differently (2: wide boxes read in pieces).
READING_VERSION = 2


def reader() -> str:
    """What reads pages now, as a cache key: the engine's version, this module's way of reading
    (:data:`READING_VERSION`), the runtime and device (a page's lines may differ between
    runtimes in a space or a dropped box, so they are never mixed)."""
    import importlib.metadata

    return (f"rapidocr-onnxruntime-{importlib.metadata.version('rapidocr-onnxruntime')}-r{READING_VERSION}-"
            f"{backend()}-{device()}")


@lru_cache(maxsize=1)
def load() -> Any:
    """The OCR engine (loaded once: its ONNX models come inside the wheel)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except Exception as exc:  # ImportError, or OpenCV/ONNX Runtime failing to load
        raise OcrUnavailable(f"rapidocr-onnxruntime cannot be imported: {type(exc).__name__}: {exc}") from None
    engine = RapidOCR(**({"intra_op_num_threads": _THREADS, "inter_op_num_threads": 1} if _THREADS else {}))
    if backend() == "torch":
        from medvl.medical.ocr_torch import device_for_ocr, use_torch

        try:
            use_torch(engine, device_for_ocr())
        except ImportError as exc:
            raise OcrUnavailable(f"the torch OCR backend needs onnx and onnx2torch: {exc}") from None
    return engine


def warm_up() -> None:
    """Load the engine and read one printed line, so that its sessions and memory exist before
    the first request (a server reading source boxes calls this at start-up)."""
    from PIL import ImageDraw

    page = Image.new("RGB", (1000, 1300), "white")
    ImageDraw.Draw(page).text((48, 100), "Metformin 500 mg PO BID", fill="black", font_size=19)
    read_boxes(page)


def describe() -> str:
    import importlib.metadata

    runtime = f"PyTorch on {device()}" if backend() == "torch" else "ONNX Runtime, CPU"
    return (f"rapidocr-onnxruntime {importlib.metadata.version('rapidocr-onnxruntime')} (PP-OCR, {runtime}) "
            "+ the project's lexicon and value rules")


Run = tuple[str, tuple[float, float, float, float]]  # a run of text and its box in pixels (x0, y0, x1, y1)

# Where a page keeps its reading (PIL's per-image ``info``): the text layer of a born-digital PDF
# page (medvl.engine.pages puts it there when it renders the page), else PP-OCR's runs once read.
TEXT_RUNS = "medvl_text_runs"


def page_runs(image: Image.Image) -> list[Run]:
    """The page's runs of text with their boxes in pixels, read once per page.

    A PDF page that carries its own text gives it (PDFium: milliseconds, the exact characters);
    any other page is read by PP-OCR (0.5-3 s) the first time and the runs kept on the page, so
    the OCR-grounded prompt, the source boxes and the OCR baseline share one reading (an
    /extract with both read each page twice before). The runs are kept with the size they were
    read at: PIL copies ``info`` into a resized copy, whose boxes would no longer fit."""
    kept = image.info.get(TEXT_RUNS)
    if kept is not None and kept[0] == image.size:
        return kept[1]
    runs = read_boxes(image)
    image.info[TEXT_RUNS] = (image.size, runs)
    return runs


# One page at a time: ONNX Runtime already spreads a page over every core, and its memory arena
# then stays at one page's peak instead of growing with the pages read at once (the server reads
# pages for source boxes from several request threads).
_ONE_PAGE_AT_A_TIME = threading.Lock()


# PP-OCR's own bar for keeping a box's text (rapidocr's text_score).
TEXT_SCORE = 0.5
# A box this many times wider than high is read again in pieces when its reading falls below
# TEXT_SCORE: the recognizer reads a 76-character line (760 x 24 px) as "a  oi o t o  e  o s"
# (score 0.46) and the line was dropped, which lost the discharge summaries' "Hospital course"
# line with its lab values on 4 of 60 synthetic pages (and taught phase 6 to state values its
# prompt did not hold). PP-OCR's recognizer is trained on crops up to 320 x 48 px.
WIDE_BOX_RATIO = 20.0
PIECE_RATIO = 12.0  # the widest piece a wide box is cut into, in multiples of its height


def read_boxes(image: Image.Image) -> list[Run]:
    """Each run of text PP-OCR found on the page, with its box, in its order; a wide box the
    recognizer could not read whole is read in pieces cut at gaps between words
    (:func:`_read_in_pieces`). In the reading pool's worker processes when there is one
    (:func:`use_pool`), else here, one page at a time."""
    pixels = np.asarray(image.convert("RGB"))
    pool = _POOL
    if pool is not None:
        return pool.read(pixels)
    return read_pixels(pixels)


def read_pixels(pixels: np.ndarray) -> list[Run]:
    """:func:`read_boxes` of a page's RGB pixels, in this process (a pool worker's unit of work)."""
    runs = []
    with _ONE_PAGE_AT_A_TIME:
        engine = load()
        result, _ = engine(pixels, text_score=0.0)  # every box: the weak ones may be read again
        for corners, text, score in result or []:
            xs, ys = [x for x, _ in corners], [y for _, y in corners]
            box = (min(xs), min(ys), max(xs), max(ys))
            if score < TEXT_SCORE and box[2] - box[0] > WIDE_BOX_RATIO * max(box[3] - box[1], 1):
                text, score = _read_in_pieces(engine, pixels, corners)
            if score >= TEXT_SCORE:
                runs.append((text, box))
    return runs


def _read_in_pieces(engine: Any, pixels: np.ndarray, corners: list) -> tuple[str, float]:
    """A wide box's text read in pieces at most :data:`PIECE_RATIO` heights wide, each cut at the
    widest gap of blank columns near its end (between words), joined with spaces; the score is
    the pieces' lowest."""
    (crop,) = engine.get_crop_img_list(pixels, [np.array(corners, dtype=np.float32)])
    pieces = [crop[:, start:end] for start, end in word_cuts(crop)]
    read, _ = engine.text_rec(pieces)
    texts = [text.strip() for text, _ in read]
    return " ".join(t for t in texts if t), min((float(score) for _, score in read), default=0.0)


def word_cuts(crop: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) columns of the pieces a text-line crop is cut into: none wider than
    :data:`PIECE_RATIO` times its height, each ended in the middle of the widest run of blank
    columns (no ink darker than the crop's mid-grey) in its right half, or at that width where
    no column is blank."""
    grey = crop.mean(axis=2) if crop.ndim == 3 else crop.astype(float)
    height, width = grey.shape
    if grey.max() - grey.min() < 32:  # no ink to tell from paper: no column is known blank
        blank = np.zeros(width, dtype=bool)
    else:
        blank = (grey < (grey.min() + grey.max()) / 2).sum(axis=0) == 0
    widest = max(int(PIECE_RATIO * height), 2)
    cuts, start = [], 0
    while width - start > widest:
        best, best_len, run = start + widest, 0, 0
        for column in range(start + widest // 2, start + widest):
            run = run + 1 if blank[column] else 0
            if run > best_len:
                best, best_len = column - run // 2, run
        cuts.append((start, best))
        start = best
    cuts.append((start, width))
    return cuts


def read_lines(image: Image.Image, runs: list[Run] | None = None) -> list[str]:
    """The page's text lines, top to bottom (from ``runs`` when given, else :func:`page_runs`). PP-OCR
    boxes each table cell apart, so boxes whose vertical centres lie within half a box height
    are one row, joined left to right: a lab table's name, value, unit, range and flag come back
    as one line, as printed."""
    boxes = []
    for text, (x0, y0, _, y1) in page_runs(image) if runs is None else runs:
        boxes.append(((y0 + y1) / 2, y1 - y0, x0, text))
    rows: list[list[tuple[float, float, float, str]]] = []
    for box in sorted(boxes):
        if rows and abs(box[0] - rows[-1][0][0]) < rows[-1][0][1] / 2:
            rows[-1].append(box)
        else:
            rows.append([box])
    return [" ".join(text for *_, text in sorted(row, key=lambda b: b[2])) for row in rows]


def _alternatives(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in words)


def _medications(text: str) -> list[dict[str, str]]:
    meds = []
    for name, *_ in DRUGS:
        match = re.search(rf"\b{re.escape(name)}\s*({_DOSE})?\s*({_alternatives(_ROUTES)})?\s*"
                          rf"({_alternatives(_FREQUENCIES)})?", text, re.I)
        if match:
            dose, route, frequency = (g or "" for g in match.groups())
            meds.append({"name": name, "dose": re.sub(rf"({_NUMBER})\s?", r"\1 ", dose, count=1),
                         "route": route, "frequency": frequency})
    return meds


def _labs(line: str) -> list[dict[str, str]]:
    """An analyte's row: its value first, then the reference range, then an H/L flag last."""
    labs = []
    for name, unit, *_ in LABS:
        match = re.search(rf"\b{re.escape(name)}\b\W*({_NUMBER})(.*)", line, re.I)
        if not match:
            continue
        rest = match.group(2)
        reference = re.search(rf"({_NUMBER})\s*-\s*({_NUMBER})", rest)
        flag = re.search(r"(?<![\w/])([HL])\s*$", rest[reference.end():]) if reference else None
        labs.append({"name": name, "value": match.group(1), "unit": unit, "flag": flag.group(1) if flag else "",
                     "reference_range": f"{reference.group(1)}-{reference.group(2)}" if reference else ""})
    return labs


def record_from_lines(lines: list[str]) -> dict[str, Any]:
    """The extraction record the rules read from OCR lines (each rule looks within a line)."""
    out = empty_structured()
    for line in lines:
        out["medications"] += [m for m in _medications(line) if m["name"] not in {x["name"] for x in out["medications"]}]
        out["lab_values"] += [lab for lab in _labs(line) if lab["name"] not in {x["name"] for x in out["lab_values"]}]
        for key, (label, value, written) in _VITALS.items():
            # no word boundary before the label: OCR glues "88 bpmTemp"; an upper-case letter is not allowed
            match = re.search(rf"(?<![A-Z]){label}\W*({value})", line)
            if match and key not in out["vitals"]:
                out["vitals"][key] = written.format(_spo2_spacing(match.group(1)))
    text = "\n".join(lines)
    for full, abbr in CONDITIONS:
        found = next((w for w in (full, abbr) if w and _written(w, text, exact_case=w == abbr)), None)
        if found:
            out["diagnoses"].append(found)
    for modality, _, _, diagnosis in RADIOLOGY:  # a report's exam is its procedure, its impression a diagnosis
        out["procedures"] += [modality] if _written(modality, text) else []
        out["diagnoses"] += [diagnosis] if _written(diagnosis, text) else []
    out["procedures"] += [p for p in PROCEDURES if _written(p, text)]
    return out


def _spo2_spacing(value: str) -> str:
    """"92%onRA" -> "92% on RA", "95%on2LNC" -> "95% on 2 L NC" (PP-OCR drops the spaces)."""
    value = re.sub(r"%\s*on\s*", "% on ", value)
    return re.sub(r"(\d)\s*L\s*NC$", r"\1 L NC", value)


def _written(term: str, text: str, exact_case: bool = False) -> bool:
    """Whether the page shows ``term``: a whole word, or, for longer terms, anywhere once spaces
    are ignored (PP-OCR drops them: "intracranialhemorrhage"). Abbreviations match exact case."""
    if re.search(rf"\b{re.escape(term)}\b", text, 0 if exact_case else re.I):
        return True
    squeezed = re.sub(r"\s", "", term.lower())
    return not exact_case and len(squeezed) >= 6 and squeezed in re.sub(r"\s", "", text.lower())


def extract(image: Image.Image) -> dict[str, Any]:
    """OCR then rules: the record as a JSON answer (what the scorer reads), its lines and timing."""
    started = time.perf_counter()
    runs = page_runs(image)
    lines = read_lines(image, runs)
    ocr_s = time.perf_counter() - started
    record = record_from_lines(lines)
    return {"response": json.dumps(record), "structured": record, "lines": lines, "runs": runs, "ocr_s": ocr_s,
            "latency_s": time.perf_counter() - started}


def structured_result(image: Image.Image) -> dict[str, Any]:
    """What /extract and the CLI return for a page read by the baseline (as
    :func:`medvl.medical.records.structured_result` for a model's answer): the record, its parse status
    ``ocr``, the same plausibility flags, the OCR lines as the raw text, the OCR runs with their
    boxes in pixels (``runs``, for medvl.medical.sources), the page's size and the time taken."""
    from medvl.medical import flags

    out = extract(image)
    return {"structured": out["structured"], "parse_status": "ocr", "flags": flags.check(out["structured"]),
            "disclaimer": flags.DISCLAIMER, "raw_text": "\n".join(out["lines"]), "runs": out["runs"],
            "page_size": image.size, "latency_s": out["latency_s"]}


def grounded_prompt(image: Image.Image, instruction: str) -> str:
    """The OCR-grounded prompt for a page (data.ocr_grounded_prompt): its OCR lines, then the
    instruction. One function for phase 5's training rows, phase 7 and the server."""
    return ocr_grounded(instruction, read_lines(image))


def png_lines(data: bytes) -> list[str]:
    """:func:`read_lines` of a page's encoded bytes: phase 5's unit of work in a worker process
    (the server decodes an upload the same way, medvl.engine.pages)."""
    import io

    with Image.open(io.BytesIO(data)) as image:
        return read_lines(image.convert("RGB"))


class ReadingPool:
    """Worker processes that read pages for a server (:func:`use_pool`): several pages at once,
    where this process reads one at a time under :data:`_ONE_PAGE_AT_A_TIME`.

    Why processes: a page's reading is rapidocr's Python and OpenCV between three network calls
    (0.07 s of a page's 0.14 s on an H100 host with TF32, docs/results/h100/ocr/), so threads of
    one process would queue on the GIL, and ONNX Runtime on the CPU spreads one page over every
    core instead. A page travels as its pixels (no file: patient data never reaches the disk) and
    its runs come back. A worker that dies (the OOM killer, a crash in a native library) breaks
    the executor: the pool is started again once and the page read again, so one bad page costs
    its own request at most."""

    def __init__(self, workers: int, threads: int, runtime: str) -> None:
        self.workers, self.threads, self.runtime = workers, threads, runtime
        self._lock = threading.Lock()
        self._executor = self._start()
        self._warming: list[Any] = []

    def _start(self) -> Any:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_pool_worker, initargs=(self.threads, self.runtime))

    def read(self, pixels: np.ndarray) -> list[Run]:
        from concurrent.futures.process import BrokenProcessPool

        executor = self._executor
        try:
            return executor.submit(read_pixels, pixels).result()
        except BrokenProcessPool:
            with self._lock:
                if self._executor is executor:
                    log.warning("an OCR worker process died: starting the reading pool again")
                    self._executor = self._start()
            return self._executor.submit(read_pixels, pixels).result()

    def warm_up(self, wait: bool = True) -> None:
        """Every worker loaded and one page read by each (first requests wait for nothing).
        ``wait=False`` starts it and returns: :meth:`wait_warm` waits for it."""
        page = np.full((200, 600, 3), 255, dtype=np.uint8)
        self._warming = [self._executor.submit(read_pixels, page) for _ in range(self.workers)]
        if wait:
            self.wait_warm()

    def wait_warm(self) -> None:
        """Wait for the warm-up :meth:`warm_up` started (raises what a worker raised)."""
        for future in self._warming:
            future.result()
        self._warming = []

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _pool_worker(threads: int, runtime: str) -> None:
    use_threads(threads, runtime)
    load()


_POOL: ReadingPool | None = None


def use_pool(workers: int, wait: bool = True) -> ReadingPool | None:
    """Read pages in ``workers`` worker processes from now on, with this process's runtime
    (:func:`backend`) and the host's cores split between them; 0 reads them here. A server
    calls it before traffic (api.ocr_workers, :func:`serving_workers`) with ``wait=False``, so
    the workers start (each imports torch and loads PP-OCR; an H100 server's 'load' grew from 3 s
    to 24 s when the pool started inside it, docs/results/h100/fp8/) while the model loads and compiles; it then waits with
    ``pool.wait_warm()``."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None
    if workers > 0:
        from medvl.core.parallel import cores

        _POOL = ReadingPool(workers, max(1, cores() // workers), backend())
        _POOL.warm_up(wait)
        log.info("OCR reads pages in %d worker processes (%s)", workers, reader())
    return _POOL


def pages_at_once() -> int:
    """How many pages this process can have read at once: the pool's workers, else one."""
    return _POOL.workers if _POOL is not None else 1


def serving_workers(setting: int) -> int:
    """The reading pool a server starts for api.ocr_workers: -1 (auto) is :data:`GPU_WORKERS`
    processes when PP-OCR runs on a GPU (PyTorch), else none (ONNX Runtime in the server's
    process already takes every core for a page); N is N."""
    if setting >= 0:
        return setting
    return GPU_WORKERS if backend() == "torch" and device() == "cuda" else 0


# Worker processes that share one GPU for PP-OCR's networks (the torch runtime): each holds a
# CUDA context (~0.5 GB) and does rapidocr's CPU work between its network calls (on an H100,
# 0.07 s of a page's 0.14 s: docs/results/h100/ocr/profile_ocr_tf32.json), so four keep the GPU
# busy. Not yet measured as a pool.
GPU_WORKERS = 4


def worker_plan(runtime: str, where: str) -> tuple[int, int]:
    """(worker processes, threads each) for reading many pages with ``runtime`` on ``where``: a
    process per core with one thread each on the CPU; on a GPU, :data:`GPU_WORKERS` processes
    splitting the host's cores between them."""
    from medvl.core.parallel import cores

    if runtime == "torch" and where == "cuda":
        workers = min(GPU_WORKERS, cores())
        return workers, max(1, cores() // workers)
    return cores(), 1


def read_pages(pages: list[bytes], desc: str) -> list[list[str]]:
    """:func:`png_lines` of each encoded page, in order, over worker processes that read as this
    process would (:func:`backend`): phase 5's training pages and AWQ's calibration pages are
    read by the runtime the server reads uploads with, so a model is trained, calibrated and
    served on one reading of a page."""
    from medvl.core.parallel import process_map

    workers, threads = worker_plan(backend(), device())
    return process_map(png_lines, pages, desc=f"{desc} ({reader()})", initializer=use_threads,
                       initargs=(threads, backend()), workers=workers)
