"""The fp8 served form's layer (medvl/model/fp8.py) on this GPU, before a run relies on it: does
torch._scaled_mm compute what the CPU's emulation does, and what does a layer cost against bf16
at Qwen2.5-VL-7B's language-model shapes (fused q/k/v, o, fused gate/up, down) for a decoding
batch (1, 32 rows) and a page's prefill (1,024, 4,096 rows)?

Why: FP8 pays only where the matmul, not the activations' quantization, is the cost; these are
the per-layer figures behind the served-form choice (issue 47), apart from the engine's.

    python -m bench.check_fp8 --out fp8_layers.json

Exits 1 when the kernel and the emulation disagree beyond bf16's output rounding, or when the
GPU has no FP8 tensor cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from medvl.model.fp8 import Fp8Linear, fp8_kernel_available, quantize_rows

log = logging.getLogger(__name__)

# (in, out) of Qwen2.5-VL-7B's language-model layers once q/k/v and gate/up are fused.
SHAPES = {"qkv_proj": (3584, 4608), "o_proj": (3584, 3584), "gate_up_proj": (3584, 37888),
          "down_proj": (18944, 3584)}
ROWS = (1, 32, 1024, 4096)
BF16_OUTPUT_ROUNDING = 2**-7


def seconds_per_call(fn, x: torch.Tensor, repeats: int) -> float:
    """Median of ``repeats`` timed calls after three warm-ups (CUDA events)."""
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per shape (median kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device("cuda")
    if not (torch.cuda.is_available() and fp8_kernel_available(device)):
        log.error("no GPU with FP8 tensor cores (compute capability 8.9+) here")
        return 1
    torch.manual_seed(0)
    layers, worst = [], 0.0
    for name, (k, n) in SHAPES.items():
        linear = torch.nn.Linear(k, n, bias=name == "qkv_proj", device=device, dtype=torch.bfloat16)
        fp8 = Fp8Linear(linear)
        for rows in ROWS:
            x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
            codes, scale = quantize_rows(x)
            want = fp8.emulated(codes, scale) + (0 if fp8.bias is None else fp8.bias.float())
            with torch.inference_mode():
                error = float((fp8(x).float() - want).abs().max() / want.abs().max())
                bf16_s = seconds_per_call(linear, x, args.repeats)
                fp8_s = seconds_per_call(fp8, x, args.repeats)
            worst = max(worst, error)
            layers.append({"layer": name, "in": k, "out": n, "rows": rows, "bf16_ms": round(bf16_s * 1e3, 4),
                           "fp8_ms": round(fp8_s * 1e3, 4), "speedup": round(bf16_s / fp8_s, 3),
                           "kernel_vs_emulation_max_rel_error": error})
            log.info("%-13s rows %5d: bf16 %.4f ms, fp8 %.4f ms (x%.2f), kernel vs emulation %.2e", name, rows,
                     bf16_s * 1e3, fp8_s * 1e3, bf16_s / fp8_s, error)
    record = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "command": "python -m bench.check_fp8 " + " ".join(sys.argv[1:]), "layers": layers,
              "worst_kernel_vs_emulation": worst, "kernel_matches_emulation": worst < BF16_OUTPUT_ROUNDING}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    return 0 if record["kernel_matches_emulation"] else 1


if __name__ == "__main__":
    sys.exit(main())
