"""PP-OCR's three networks (text detection, direction, recognition) run by PyTorch, on the GPU
when there is one, inside rapidocr's own pipeline.

Why: a page's OCR on the CPU takes 0.5 s on an H100 host's CPU (2-3 s on a 2-core one), in one
thread, so /extract with source boxes served 1.82 requests/s at 32 clients against 18.50 without
(issue 44). ONNX Runtime's CUDA build is a 255 MB wheel; the same ONNX graphs, converted by
onnx2torch, run in the PyTorch the server already has. rapidocr keeps its pre- and
post-processing (resizing, the DB box finder, CTC decoding); only the three ONNX Runtime sessions
are swapped for :class:`TorchSession`, called as rapidocr calls them (numpy in, a list of numpy
out). ``tests/test_ocr.py`` checks the texts and boxes against ONNX Runtime's on the phase-3 pages.

The ONNX files need two repairs first (:func:`loadable`): their weights are ``Constant`` nodes,
which onnx2torch does not read as weights (they become initializers), and the recognizer's
shape inference loses the rank of some convolution outputs after a dynamic reshape, which its
batch norms need (a 2-D convolution's output is 4-D).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

# An input shape of each network, for shape inference only (the converted modules take any batch,
# height and width, as rapidocr feeds them).
INFERENCE_SHAPES = {"det": (1, 3, 736, 736), "cls": (6, 3, 48, 192), "rec": (6, 3, 48, 320)}


def loadable(path: Path, shape: tuple[int, ...]) -> Any:
    """The ONNX model at ``path``, repaired for onnx2torch (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for dim, value in zip(graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        dim.Clear()
        dim.dim_value = value
    model = onnx.shape_inference.infer_shapes(model)
    known = {info.name: info for info in model.graph.value_info}
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        name = node.input[0]
        info = known.get(name)
        if (node.op_type == "BatchNormalization" and producer.get(name) is not None
                and producer[name].op_type == "Conv" and (info is None or not info.type.tensor_type.shape.dim)):
            if info is not None:
                model.graph.value_info.remove(info)
            model.graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", "c", "h", "w"]))
    return model


class TorchSession:
    """One of rapidocr's ONNX models as a PyTorch module on ``device``, called as rapidocr calls
    its ONNX Runtime session: a float32 batch in, ``[output]`` out."""

    def __init__(self, path: Path, shape: tuple[int, ...], device: torch.device) -> None:
        from onnx2torch import convert

        self.device = device
        self.module = convert(loadable(path, shape)).eval().to(device)

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        # TF32 or true float32 convolutions by ALLOW_TF32 (None: that flag is left as it is).
        with torch.inference_mode(), torch.backends.cudnn.flags(
                enabled=None, benchmark=None, benchmark_limit=None, deterministic=None, allow_tf32=ALLOW_TF32,
                fp32_precision=None):
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device))
        return [out.float().cpu().numpy()]


# TF32 convolutions (PyTorch's cuDNN default), not true float32. Measured on an H100 over the
# five phase-3 pages (docs/results/h100/ocr/, bench/check_ocr_runtimes.py, bench/profile_ocr.py):
# TF32 read a page in 0.139 s (ONNX Runtime on 16 cores: 0.483 s), its recognizer peaking at
# 111 MB, and 3 of 74 lines differed from ONNX Runtime's by a space ("25 mgPO BID" against
# "25 mgPOBID"); float32 matched all 74 lines but took 0.495 s a page, its recognizer's
# convolutions taking a 32 GB cuDNN workspace (eight phase-5 workers ran the card out of
# memory). PP-OCR's spacing moves between runtimes anyway; phase 5, AWQ's calibration, phase 7
# and the server read with one runtime on one host (api.ocr_backend), so a model is trained on
# the reading it is served.
ALLOW_TF32 = True


def device_for_ocr() -> torch.device:
    """The GPU when one is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_torch(engine: Any, device: torch.device) -> None:
    """Swap a RapidOCR engine's three ONNX Runtime sessions for :class:`TorchSession` on ``device``."""
    models = Path(__import__("rapidocr_onnxruntime").__file__).parent / "models"
    parts = {"det": (engine.text_det, "infer", "ch_PP-OCRv4_det_infer.onnx"),
             "cls": (engine.text_cls, "infer", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
             "rec": (engine.text_rec, "session", "ch_PP-OCRv4_rec_infer.onnx")}
    for key, (part, attribute, filename) in parts.items():
        setattr(part, attribute, TorchSession(models / filename, INFERENCE_SHAPES[key], device))
    log.info("OCR networks run by PyTorch on %s", device)
