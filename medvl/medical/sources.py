"""Where on the page each extracted value is: the box of the OCR text it matches, or none.

Why OCR: the model answers with text, not positions; the page's OCR (the engine phase 7 runs,
medvl/medical/ocr.py) gives each run of text a box, so a value found in a run gets that run's
box narrowed to the value's characters (PP-OCR's boxes hold one line or table cell; characters
are taken as equally wide inside it). A value found nowhere on its page gets ``None``: the
model wrote something the page does not show, which is a reason to review it (a transcription
error, or an invention). Matching ignores case and spaces, because PP-OCR often drops the
spaces between words ("Metformin500mgPO").

Boxes are normalised to the page: ``[x0, y0, x1, y1]`` in 0..1, origin top left.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from medvl.medical import ocr
from medvl.medical.records import resolve_pointer

log = logging.getLogger(__name__)

Box = list[float]


def _squashed(text: str) -> tuple[str, list[int]]:
    """``text`` lower-cased without spaces, and where each kept character was in ``text``."""
    kept = [(i, c.lower()) for i, c in enumerate(text) if not c.isspace()]
    return "".join(c for _, c in kept), [i for i, _ in kept]


def page_runs(image: Image.Image) -> list[tuple[str, Box]]:
    """The page's runs (its PDF text layer, else its OCR, read once: :func:`medvl.medical.ocr.page_runs`)
    with normalised boxes."""
    return normalised(ocr.page_runs(image), image.size)


def normalised(runs: list[ocr.Run], size: tuple[int, int]) -> list[tuple[str, Box]]:
    """OCR runs with boxes in pixels -> boxes in 0..1 of a page of ``size`` (width, height)."""
    width, height = size
    return [(text, [x0 / width, y0 / height, x1 / width, y1 / height]) for text, (x0, y0, x1, y1) in runs]


def locate(value: str, runs: list[tuple[str, Box]], near: Box | None = None) -> Box | None:
    """The box of ``value`` (case and spaces ignored), narrowed to its characters; None when no
    run holds it. Among the runs that hold it: one on the same line as ``near`` (the item's
    first field: a lab's value on its name's row, not in another row's range) first, then a run
    that is the value and nothing else, then reading order."""
    wanted, _ = _squashed(value)
    if not wanted:
        return None
    found = []
    for order, (text, box) in enumerate(runs):
        squashed, where = _squashed(text)
        at = squashed.find(wanted)
        if at >= 0:
            same_line = near is not None and abs((box[1] + box[3]) / 2 - (near[1] + near[3]) / 2) < (near[3] - near[1]) / 2
            found.append((not same_line, squashed != wanted, order, text, box, where[at], where[at + len(wanted) - 1] + 1))
    if not found:
        return None
    *_, text, (x0, y0, x1, y1), first, last = min(found)
    share = (x1 - x0) / max(len(text), 1)
    return [round(x0 + first * share, 4), round(y0, 4), round(x0 + last * share, 4), round(y1, 4)]


def source_runs(images: list[Image.Image]) -> list[list[tuple[str, Box]]] | None:
    """Each page's OCR runs with their boxes (:func:`page_runs`), or None (logged) where the OCR
    engine cannot run: the record then comes without boxes rather than not at all."""
    try:
        return [page_runs(image) for image in images]
    except ocr.OcrUnavailable as exc:
        log.warning("no source boxes: %s", exc)
        return None


def item_boxes(document: dict[str, Any], runs_by_page: list[list[tuple[str, Box]]]) -> None:
    """Give each item of ``document`` (medvl.medical.records.document_result) ``boxes``: each
    non-empty field's box on the item's page (a diagnosis's or a vital's under ``value``), None
    where the page does not show it; items with a value not found join ``needs_review`` after the
    unsure ones, most fields missing first. In place."""
    structured = document["structured"]
    for item in document["items"]:
        value = resolve_pointer(structured, item["pointer"])
        fields = value if isinstance(value, dict) else {"value": value}
        runs, boxes, near = runs_by_page[item["page"] - 1], {}, None
        for name, text in fields.items():
            if str(text).strip():
                boxes[name] = locate(str(text), runs, near)
                near = near or boxes[name]
        item["boxes"] = boxes
    # The items with a value not on the page, those with most of their fields missing first: a
    # record the page does not show at all before a reference range the OCR missed.
    missing = [item["pointer"] for item in sorted(document["items"], key=_share_not_found, reverse=True)
               if None in item["boxes"].values()]
    document["needs_review"] = [*document.get("needs_review", []),
                                *(p for p in missing if p not in document.get("needs_review", []))]


def _share_not_found(item: dict[str, Any]) -> float:
    boxes = item["boxes"]
    return sum(box is None for box in boxes.values()) / max(len(boxes), 1)
