#!/usr/bin/env python3
"""The 4-bit kernel table (issue 32): each candidate's time for the language model's linear
layers of Qwen2.5-7B (28 layers: fused q/k/v 3584->4608, o 3584->3584, fused gate/up
3584->37888, down 18944->3584), summed, at decode batches M = 1, 8, 16, 32, 64 and at prefills
of one page (736 tokens) and eight (5,888), against bf16 on the same card.

Candidates, all from the same random group-128 codes (w = (q - 8) s + z):
- ``bf16``: the dequantized weights in bf16, ``F.linear`` (cuBLAS): the bar;
- ``tinygemm``: torchao's ``Int4TilePackedTo4dTensor`` (what the int4 forms serve through today);
- ``dequant_cublas``: the layer dequantized to a bf16 scratch by a compiled elementwise kernel,
  then cuBLAS (:func:`medvl.model.w4a16.dequantize_packed`): for many rows;
- ``dequant_triton_cublas``: the same with the project's Triton dequantize kernel
  (:func:`medvl.model.w4a16.dequantize_triton`, what the served layers run), its ``block_n``
  picked from a sweep (``--dequant-only`` times just the prefills of these two);
- ``triton_w4a16``: the project's Triton kernel (:mod:`medvl.model.w4a16`), its tile shape
  picked per layer shape and M from a sweep (each candidate timed on that layer's weight).

Decode batches are timed eager and as one CUDA graph of all 112 matmuls (the engine replays its
decoding step as a graph, so launch overhead is not what it pays); prefills eager. Weights are
28 distinct copies (no layer is served from L2 twice). Steady state: warm-up replays first, then
the median of ``--repeats`` timed replays.

    python bench/int4_kernels.py --out docs/results/h100/int4_kernels.json

Needs a CUDA GPU, torchao and Triton.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medvl.model.int4 import GroupInt4
from medvl.model.w4a16 import TileConfig, dequantize_packed, dequantize_triton, pack_codes, w4a16_matmul

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}  # in, out
LAYERS = 28
GROUP = 128
DECODE_M = (1, 8, 16, 32, 64)
DEQUANT_BLOCK_N = [32]  # the Triton dequantize kernel's block_n, set from the sweep in main()
PREFILL_M = (736, 5888)


def sweep_configs(m: int) -> list[TileConfig]:
    """The tile shapes tried at ``m`` rows."""
    if m <= 64:
        block_m = max(16, 1 << (m - 1).bit_length())
        return [TileConfig(block_m, n, 128, split, 4, stages) for n in (32, 64, 128) for split in (1, 2, 4)
                for stages in (2, 3, 4)]
    return [TileConfig(bm, bn, bk, 1, warps, 3) for bm in (64, 128) for bn in (64, 128) for bk in (64, 128)
            for warps in (4, 8)]


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, after three warm-up runs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured once as a CUDA graph; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # allocations and lazy initialisation outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def build_layers(device: torch.device) -> dict[str, list[dict]]:
    """28 random layers per shape, each in every candidate's form."""
    generator = torch.Generator(device=device).manual_seed(0)
    layers: dict[str, list[dict]] = {}
    for name, (k, n) in SHAPES.items():
        layers[name] = []
        for _ in range(LAYERS):
            codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator, device=device)
            scale = (torch.rand(n, k // GROUP, generator=generator, device=device) * 0.01 + 0.001).to(torch.bfloat16)
            zero = (torch.randn(n, k // GROUP, generator=generator, device=device) * 0.01).to(torch.bfloat16)
            group = GroupInt4(codes, scale, zero.float(), GROUP)
            packed = pack_codes(codes)
            layers[name].append({"packed": packed, "scale": scale, "zero": zero,
                                 "bf16": dequantize_packed(packed, scale, zero, GROUP),
                                 "tinygemm": group.to_kernel(torch.bfloat16, device)})
        torch.cuda.empty_cache()
    return layers


def pick_config(layer: dict, x: torch.Tensor, repeats: int) -> tuple[TileConfig, float, int]:
    """The fastest tile shape for one layer at ``x``'s rows; the number that compiled and ran."""
    best, best_ms, tried = None, float("inf"), 0
    k = layer["packed"].shape[1] * 2
    for config in sweep_configs(x.shape[0]):
        if k % (config.block_k * config.split_k):
            continue
        try:
            ms = timed(lambda c=config: w4a16_matmul(x, layer["packed"], layer["scale"], layer["zero"], GROUP, c),
                       repeats)
        except Exception:  # a tile shape that does not fit the card's shared memory
            continue
        tried += 1
        if ms < best_ms:
            best, best_ms = config, ms
    return best, best_ms, tried


def run_all(method: str, layers: dict[str, list[dict]], inputs: dict[str, torch.Tensor],
            configs: dict[str, TileConfig], dequant) -> None:
    """One pass of ``method`` over every layer of every shape."""
    for name in SHAPES:
        for layer in layers[name]:
            if method == "bf16":
                F.linear(inputs[name], layer["bf16"])
            elif method == "tinygemm":
                F.linear(inputs[name], layer["tinygemm"])
            elif method == "dequant_cublas":
                F.linear(inputs[name], dequant(layer["packed"], layer["scale"], layer["zero"], GROUP))
            elif method == "dequant_triton_cublas":
                F.linear(inputs[name], dequantize_triton(layer["packed"], layer["scale"], layer["zero"], GROUP,
                                                         DEQUANT_BLOCK_N[0]))
            else:
                w4a16_matmul(inputs[name], layer["packed"], layer["scale"], layer["zero"], GROUP, configs[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prefill-repeats", type=int, default=5)
    parser.add_argument("--sweep-repeats", type=int, default=10)
    parser.add_argument("--dequant-only", action="store_true",
                        help="time only the two dequantize paths, at the prefill sizes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    started = time.perf_counter()
    layers = build_layers(device)
    dequant = torch.compile(dequantize_packed, dynamic=False)
    report = {"command": " ".join(["python", *sys.argv]), "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "python": platform.python_version(), "layers": LAYERS, "group": GROUP,
              "shapes_in_out": SHAPES, "unit": "ms for all 28 layers x 4 shapes (112 matmuls)", "rows": []}
    layer = layers["gate_up"][0]
    sweep_ms = {n: timed(lambda n=n: dequantize_triton(layer["packed"], layer["scale"], layer["zero"], GROUP, n),
                         args.sweep_repeats) for n in (8, 16, 32, 64, 128)}
    DEQUANT_BLOCK_N[0] = min(sweep_ms, key=sweep_ms.get)
    report["dequantize_triton_block_n_sweep_ms"] = {"layer": "gate_up", **sweep_ms, "picked": DEQUANT_BLOCK_N[0]}
    print(json.dumps(report["dequantize_triton_block_n_sweep_ms"]), flush=True)
    methods = ("dequant_cublas", "dequant_triton_cublas") if args.dequant_only else \
        ("bf16", "tinygemm", "dequant_cublas", "dequant_triton_cublas", "triton_w4a16")
    for m in PREFILL_M if args.dequant_only else (*DECODE_M, *PREFILL_M):
        x = torch.randn(m, 18944, device=device, dtype=torch.bfloat16)
        inputs = {name: x[:, :k].contiguous() for name, (k, _) in SHAPES.items()}
        configs, sweep = {}, {}
        for name in SHAPES if "triton_w4a16" in methods else ():
            layer = layers[name][0]
            config, ms, tried = pick_config(layer, inputs[name], args.sweep_repeats)
            configs[name] = config
            sweep[name] = {"config": vars(config) if config else None, "one_layer_ms": ms, "configs_tried": tried}
            if config is not None:  # a fast kernel must also be right: against bf16 on the same weights
                reference = F.linear(inputs[name], layer["bf16"]).float()
                got = w4a16_matmul(inputs[name], layer["packed"], layer["scale"], layer["zero"], GROUP, config).float()
                sweep[name]["max_error_vs_bf16"] = float((got - reference).abs().max() / reference.abs().max())

        row = {"m": m, "kind": "decode" if m in DECODE_M else "prefill", "triton_configs": sweep}
        for method in methods:
            if method == "triton_w4a16" and not all(configs.values()):
                row[method] = None
                continue
            repeats = args.repeats if m in DECODE_M else args.prefill_repeats
            call = functools.partial(run_all, method, layers, inputs, configs, dequant)
            row[method] = {"eager_ms": timed(call, repeats)}
            if m in DECODE_M:
                row[method]["graph_ms"] = timed(graphed(call), args.repeats)
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "triton_configs"}), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
