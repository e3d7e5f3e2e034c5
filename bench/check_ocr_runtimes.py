"""Read the phase-3 pages with PP-OCR under ONNX Runtime (CPU) and under PyTorch (the GPU when
there is one) and say where their readings differ and what a page costs each.

Why: phase 5 and AWQ's calibration read pages with the server's OCR runtime (api.ocr_backend;
"auto" is PyTorch on a GPU), so a trained model sees what it is served. The two runtimes agree
line for line on this project's CPU (tests/test_ocr.py); this says how far they differ on a
GPU (TF32 convolutions, or float32 with --float32) before a GPU run relies on it, and gives each
runtime's cost per page. Exits 1 when the PyTorch runtime cannot read a page, so a run can fall back to ONNX
Runtime instead of failing in phase 4.

    python -m bench.check_ocr_runtimes --out ocr_runtimes.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from medvl.medical import ocr
from medvl.medical.documents import benchmark_documents, render_document

log = logging.getLogger(__name__)


def read_all(runtime: str, pages: list, repeats: int) -> tuple[list[list[str]], list[float]]:
    """Each page's lines with ``runtime`` (the first reading) and the seconds of every reading
    after a warm-up page."""
    ocr.use_backend(runtime)
    ocr.warm_up()
    lines, seconds = [], []
    for page in pages:
        for i in range(repeats):
            started = time.perf_counter()
            runs = ocr.read_boxes(page)
            seconds.append(time.perf_counter() - started)
            if i == 0:
                lines.append(ocr.read_lines(page, runs))
    return lines, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=5, help="phase-3 pages (seed 1234), one of each kind first")
    parser.add_argument("--repeats", type=int, default=3, help="readings of each page timed per runtime")
    parser.add_argument("--float32", action="store_true",
                        help="true float32 convolutions on the GPU (default: TF32, medvl.medical.ocr_torch.ALLOW_TF32)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from medvl.medical import ocr_torch

    ocr_torch.ALLOW_TF32 = not args.float32
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pages = [render_document(doc) for doc in benchmark_documents(1234, args.pages)]
    result: dict = {"pages": len(pages), "tf32": not args.float32}
    reference, cpu_s = read_all("onnxruntime", pages, args.repeats)
    result["onnxruntime"] = {"reader": ocr.reader(), "page_s_median": statistics.median(cpu_s)}
    try:
        torch_lines, torch_s = read_all("torch", pages, args.repeats)
    except Exception as exc:  # the fallback's reason, whatever broke
        result["torch"] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.write_text(json.dumps(result, indent=2))
        log.error("the PyTorch runtime failed: %s", result["torch"]["error"])
        return 1
    differing = [{"page": i, "onnxruntime": a, "torch": b}
                 for i, (ref, got) in enumerate(zip(reference, torch_lines, strict=True))
                 for a, b in zip(ref + [""] * (len(got) - len(ref)), got + [""] * (len(ref) - len(got)), strict=True)
                 if a != b]
    result["torch"] = {"reader": ocr.reader(), "page_s_median": statistics.median(torch_s),
                       "lines": sum(map(len, torch_lines)), "lines_differing": len(differing),
                       "differences": differing[:20]}
    args.out.write_text(json.dumps(result, indent=2))
    log.info("onnxruntime %.3f s a page, torch %.3f s a page; %d of %d lines differ",
             result["onnxruntime"]["page_s_median"], result["torch"]["page_s_median"], len(differing),
             sum(map(len, reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
