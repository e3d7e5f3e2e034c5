"""Where a page's PP-OCR time and GPU memory go under the PyTorch runtime: each network call
(detection, direction, recognition) timed with the GPU synchronised, its input shape and the
allocator's peak, against the page's whole reading.

Why: phase 5 of the `small` profile on an H100 (2026-12-07) read pages with PyTorch on the GPU
at 0.44 s a page (ONNX Runtime on 16 cores: 0.42 s), and eight worker processes ran the card
out of memory (two held 32-34 GB each): neither is what three small networks should cost. This
found the recognizer's float32 convolutions (a 32 GB cuDNN workspace, 0.37 s a page; with TF32
111 MB and 0.16 s).

    python -m bench.profile_ocr --pages 6 --out profile_ocr_tf32.json
    python -m bench.profile_ocr --pages 6 --float32 --out profile_ocr.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from medvl.medical import ocr, ocr_torch
from medvl.medical.documents import generate_document, render_document

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--float32", action="store_true",
                        help="true float32 convolutions (default: TF32, medvl.medical.ocr_torch.ALLOW_TF32)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    calls: list[dict] = []
    plain_call = ocr_torch.TorchSession.__call__

    def timed(self, batch):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = plain_call(self, batch)
        torch.cuda.synchronize()
        calls.append({"part": self.part, "shape": list(batch.shape), "s": time.perf_counter() - started,
                      "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                      "reserved_mb": torch.cuda.memory_reserved() / 2**20})
        return out

    ocr_torch.TorchSession.__call__ = timed
    ocr_torch.ALLOW_TF32 = not args.float32
    ocr.use_backend("torch")
    engine = ocr.load()
    for part, attr in (("det", engine.text_det.infer), ("cls", engine.text_cls.infer), ("rec", engine.text_rec.session)):
        attr.part = part
    pages = [render_document(generate_document(100_000 + i, prefix="syn")) for i in range(args.pages + 1)]
    ocr.read_boxes(pages[0])  # warm-up
    calls.clear()
    page_s = []
    for page in pages[1:]:
        started = time.perf_counter()
        ocr.read_boxes(page)
        page_s.append(time.perf_counter() - started)
    parts: dict[str, dict] = defaultdict(lambda: {"calls": 0, "s": 0.0, "peak_mb": 0.0, "widest": 0})
    for call in calls:
        p = parts[call["part"]]
        p["calls"] += 1
        p["s"] += call["s"]
        p["peak_mb"] = max(p["peak_mb"], call["peak_mb"])
        p["widest"] = max(p["widest"], call["shape"][-1])
    network_s = sum(c["s"] for c in calls)
    result = {"device": torch.cuda.get_device_name(), "tf32": not args.float32, "pages": args.pages,
              "page_s_median": statistics.median(page_s), "page_s_mean": statistics.mean(page_s),
              "network_s_per_page": network_s / args.pages,
              "rest_s_per_page": (sum(page_s) - network_s) / args.pages,
              "parts": {k: {**v, "s_per_page": v["s"] / args.pages} for k, v in parts.items()},
              "reserved_mb_end": torch.cuda.memory_reserved() / 2**20, "calls": calls[:60]}
    args.out.write_text(json.dumps(result, indent=2))
    log.info("page %.3f s: networks %.3f s, the rest %.3f s; per part (calls, s a page, peak MB): %s",
             result["page_s_mean"], result["network_s_per_page"], result["rest_s_per_page"],
             {k: (v["calls"], round(v["s_per_page"], 3), round(v["peak_mb"])) for k, v in result["parts"].items()})


if __name__ == "__main__":
    main()
