"""The bar a fine-tuned VLM must clear: classical OCR plus rules, mapped to the extraction record.

OCR is rapidocr-onnxruntime: PP-OCR detection and recognition models shipped inside its wheel,
run by ONNX Runtime on the CPU, nothing downloaded at run time (measured here: 1-2 s per
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


def use_threads(count: int) -> None:
    """Read pages with ``count`` ONNX Runtime and OpenCV threads from now on (a worker's
    initializer): 16 workers on 16 cores each took 4 s a page with OpenCV's default pool of a
    thread per core (phase 5 on an H100 host: 1,500 pages in 376 s)."""
    global _THREADS
    _THREADS = count
    try:
        import cv2

        cv2.setNumThreads(count)
    except ImportError:  # rapidocr brings OpenCV; without it load() says why
        pass
    load.cache_clear()


@lru_cache(maxsize=1)
def load() -> Any:
    """The OCR engine (loaded once: its ONNX models come inside the wheel)."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except Exception as exc:  # ImportError, or OpenCV/ONNX Runtime failing to load
        raise OcrUnavailable(f"rapidocr-onnxruntime cannot be imported: {type(exc).__name__}: {exc}") from None
    return RapidOCR(**({"intra_op_num_threads": _THREADS, "inter_op_num_threads": 1} if _THREADS else {}))


def warm_up() -> None:
    """Load the engine and read one printed line, so that its sessions and memory exist before
    the first request (a server reading source boxes calls this at start-up)."""
    from PIL import ImageDraw

    page = Image.new("RGB", (1000, 1300), "white")
    ImageDraw.Draw(page).text((48, 100), "Metformin 500 mg PO BID", fill="black", font_size=19)
    read_boxes(page)


def describe() -> str:
    import importlib.metadata

    return (f"rapidocr-onnxruntime {importlib.metadata.version('rapidocr-onnxruntime')} (PP-OCR, ONNX Runtime, CPU) "
            "+ the project's lexicon and value rules")


Run = tuple[str, tuple[float, float, float, float]]  # a run of text and its box in pixels (x0, y0, x1, y1)


# One page at a time: ONNX Runtime already spreads a page over every core, and its memory arena
# then stays at one page's peak instead of growing with the pages read at once (the server reads
# pages for source boxes from several request threads).
_ONE_PAGE_AT_A_TIME = threading.Lock()


def read_boxes(image: Image.Image) -> list[Run]:
    """Each run of text PP-OCR found on the page, with its box, in its order."""
    pixels = np.asarray(image.convert("RGB"))
    with _ONE_PAGE_AT_A_TIME:
        result, _ = load()(pixels)
    runs = []
    for corners, text, _ in result or []:
        xs, ys = [x for x, _ in corners], [y for _, y in corners]
        runs.append((text, (min(xs), min(ys), max(xs), max(ys))))
    return runs


def read_lines(image: Image.Image, runs: list[Run] | None = None) -> list[str]:
    """The page's text lines, top to bottom (from its OCR ``runs`` when already read). PP-OCR
    boxes each table cell apart, so boxes whose vertical centres lie within half a box height
    are one row, joined left to right: a lab table's name, value, unit, range and flag come back
    as one line, as printed."""
    boxes = []
    for text, (x0, y0, _, y1) in read_boxes(image) if runs is None else runs:
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
    runs = read_boxes(image)
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


def grounded_png_prompt(page_and_instruction: tuple[bytes, str]) -> str:
    """:func:`grounded_prompt` of a page's encoded bytes: phase 5's unit of work in a worker
    process (the server decodes an upload the same way, medvl.engine.pages)."""
    import io

    data, instruction = page_and_instruction
    with Image.open(io.BytesIO(data)) as image:
        return grounded_prompt(image.convert("RGB"), instruction)
