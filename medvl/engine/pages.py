"""An upload's pages: an image is one page, a PDF is rendered page by page (pypdfium2).

Documents arrive as multi-page PDFs (a discharge summary, a lab panel over two pages, a faxed
prescription). Every route and the CLI read an upload through :func:`decode_pages`, so a PDF
refused by one is refused by the other with the same message and status.

- Rendering: PDFium (pypdfium2), from the bytes in memory (nothing is written to disk), each page
  at ``api.pdf_render_dpi`` (150 by default: a Letter page is 1275x1650, 2.1 M pixels, above every
  profile's pixel budget, which the processor then scales each page to, as it does an image;
  and the resolution the OCR engine reads best), a page's pixels capped at
  ``api.max_image_pixels`` by rendering it smaller (a poster-sized page must not become a
  900 M-pixel bitmap).
- Checked before any rendering: the size, the ``%%EOF`` marker (a PDF cut in transit is named
  truncated, not "data format error"), a password (encrypted documents are refused; a PDF
  encrypted only against editing, with an empty user password, opens as any viewer opens it),
  and the page count against ``api.max_pdf_pages``.
- Text: a page that carries its own text (a born-digital PDF) keeps it, with each line's box,
  on the rendered image (:func:`text_layer`); the OCR-grounded prompt, the source boxes and the
  OCR baseline then read it instead of running OCR (milliseconds against seconds a page).
- PDFium is not thread-safe: one lock serialises every call into it (the server prepares
  requests in two threads).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from medvl.core.settings import ApiSettings
from medvl.engine.images import MAX_ASPECT_RATIO, BadInput, decode_image
from medvl.medical.ocr import TEXT_RUNS, Run

PDF_MAGIC = b"%PDF-"
PDF_POINTS_PER_INCH = 72
# The header may follow up to 1 KB of junk (PDF 1.7, annex H), the end marker precede as much.
MARKER_WINDOW = 1024
_PDFIUM_LOCK = threading.Lock()
PAGE_BREAK = "\f"  # between a PDF's page answers in one text, as pdftotext separates pages


@dataclass(frozen=True)
class PageLimits:
    """What one upload may be: bytes, pixels per page, pages per PDF, and the render resolution."""

    max_bytes: int
    max_pixels: int
    max_pages: int
    dpi: int

    @classmethod
    def from_settings(cls, api: ApiSettings) -> PageLimits:
        """The server's and the CLI's limits, from the api settings."""
        return cls(int(api.max_upload_mb * 2**20), api.max_image_pixels, api.max_pdf_pages, api.pdf_render_dpi)


def is_pdf(data: bytes) -> bool:
    """Whether ``data`` starts as a PDF (its ``%PDF-`` header within the first kilobyte)."""
    return PDF_MAGIC in data[:MARKER_WINDOW]


def decode_pages(data: bytes, limits: PageLimits) -> list[Image.Image]:
    """Upload bytes -> its pages as RGB images; :class:`BadInput` (with the status to answer)
    for an empty, oversized, unreadable, truncated, encrypted or over-long document."""
    if data and is_pdf(data):
        if len(data) > limits.max_bytes:
            raise BadInput(f"the file is {len(data)} bytes; the limit is {limits.max_bytes}", 413, "file_too_large")
        return render_pdf(data, limits)
    return [decode_image(data, limits.max_bytes, limits.max_pixels)]


def render_pdf(data: bytes, limits: PageLimits) -> list[Image.Image]:
    """Every page of a PDF, rendered in memory at ``limits.dpi`` (fewer pixels for huge pages)."""
    if b"%%EOF" not in data[-MARKER_WINDOW:]:
        raise BadInput("the PDF is truncated: it does not end with its %%EOF marker (cut short in transit?)",
                       400, "truncated_pdf")
    with _PDFIUM_LOCK:
        try:
            pdf = pdfium.PdfDocument(data)
        except pdfium.PdfiumError as exc:
            if exc.err_code == pdfium_c.FPDF_ERR_PASSWORD:
                raise BadInput("the PDF is encrypted with a password; send it decrypted", 400, "encrypted_pdf") from None
            raise BadInput(f"not a readable PDF ({exc})", 400, "bad_pdf") from None
        try:
            count = len(pdf)
            if count == 0:
                raise BadInput("the PDF has no pages", 400, "bad_pdf")
            if count > limits.max_pages:
                raise BadInput(f"the PDF has {count} pages; the limit is {limits.max_pages} (api.max_pdf_pages)",
                               400, "too_many_pages")
            return [_render_page(pdf[index], index + 1, limits) for index in range(count)]
        finally:
            pdf.close()


def _render_page(page: pdfium.PdfPage, number: int, limits: PageLimits) -> Image.Image:
    width, height = page.get_size()  # points, rotation applied
    if min(width, height) <= 0 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadInput(f"page {number} is {width:.0f}x{height:.0f} points; aspect ratios above "
                       f"{MAX_ASPECT_RATIO}:1 cannot be processed", 400, "bad_pdf")
    scale = limits.dpi / PDF_POINTS_PER_INCH
    if width * height * scale**2 > limits.max_pixels:
        scale = math.sqrt(limits.max_pixels / (width * height))
        # PDFium rounds a bitmap's sides up: scale to whole pixels below the limit's sides
        scale = min(math.floor(width * scale) / width, math.floor(height * scale) / height) * (1 - 1e-9)
    try:
        image = page.render(scale=scale).to_pil().convert("RGB")
        runs = text_layer(page, scale)
    except pdfium.PdfiumError as exc:
        raise BadInput(f"page {number} of the PDF cannot be rendered ({exc})", 400, "bad_pdf") from None
    finally:
        page.close()
    if runs:  # a page with its own text needs no OCR (medvl.medical.ocr.page_runs)
        image.info[TEXT_RUNS] = (image.size, runs)
    return image


def text_layer(page: pdfium.PdfPage, scale: float) -> list[Run]:
    """The page's own text (a born-digital PDF), one run per PDFium text rectangle (a line or a
    cell), with its box in the pixels of the page rendered at ``scale``; empty for a scanned page
    (only an image) and for a rotated one (its text rectangles are in the unrotated page's
    space: OCR reads what was rendered instead)."""
    if page.get_rotation():
        return []
    left0, _, _, top0 = page.get_cropbox()
    textpage = page.get_textpage()
    try:
        runs = []
        for index in range(textpage.count_rects()):
            left, bottom, right, top = textpage.get_rect(index)
            text = " ".join(textpage.get_text_bounded(left, bottom, right, top).split())
            if text:
                runs.append((text, ((left - left0) * scale, (top0 - top) * scale,
                                    (right - left0) * scale, (top0 - bottom) * scale)))
        return runs
    finally:
        textpage.close()


def headed_page_texts(texts: list[str]) -> str:
    """A document's free-text page answers as one text: an image's answer as it is, a PDF's each
    under a "Page N:" heading (each page is asked on its own: the context holds one page)."""
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"Page {number}:\n{text}" for number, text in enumerate(texts, 1))
