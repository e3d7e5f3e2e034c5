"""A W4A16 matmul of our own (Triton), and the dequantize-to-bf16 path, over one packed layout.

Why: torchao's tinygemm (the kernel every int4 form served through) is fast for one row and
slow for many. Measured on an H100 over the 28 layers of Qwen2.5-7B (issue 32): 3.5 ms at M = 1
against bf16's 6.7, but 16.8 ms at M = 32 and 360 ms for one page's 736-token prefill, where bf16
takes 13 ms. A kernel that reads the 4-bit weights once per step should stay memory-bound up to
the engine's batch (the weights are a quarter of bf16's bytes), and a prefill's many rows are
better served by dequantizing a layer to bf16 and handing it to cuBLAS.

Layout (:func:`pack_codes`): codes q in [0, 15] two per byte along the inputs (low nibble
first), ``[out, in / 2]`` uint8; a bf16 scale s and zero z per group of ``group`` inputs,
``[out, in / group]``; the weight is w = (q - 8) s + z, tinygemm's convention
(:class:`medvl.model.int4.GroupInt4`), so AWQ's codes carry over as they do there.

:class:`W4A16Linear` is how the int4 forms serve (AWQ and round-to-nearest both): on a GPU a
call of up to :data:`DEQUANTIZE_ROWS` rows (every decoding step) runs the Triton kernel, a
longer one (a page's prefill) dequantizes the layer to a bf16 scratch (one layer at a time, freed
after its matmul) and runs cuBLAS; on a CPU every call dequantizes. The kernel table that chose
this (``bench/int4_kernels.py``, ``docs/results/h100/int4_kernels.json``; one H100, 28 layers,
ms with CUDA graphs): M = 1: bf16 4.90, tinygemm 2.60, Triton 4.37, dequantize + cuBLAS 19.7;
M = 8: 5.03 / 5.65 / 4.43 / 19.7; M = 16: 5.06 / 9.18 / 4.68 / 19.7; M = 32: 5.03 / 16.8 / 6.02 /
19.6; M = 64: 5.21 / 32.5 / 7.21 / 19.6; one page (736 rows, eager): 15.3 / 359 / 38.4 / 29.6;
eight pages (5,888): 116 / 2,854 / 288 / 131. The dequantize figures are a compiled elementwise
kernel's; :func:`dequantize_triton`, which the layers run, does one page in 21.5 ms and eight in
121.8 (``docs/results/h100/int4_dequant.json``).

The Triton kernel tiles the output ``BLOCK_M x BLOCK_N``, walks the inputs ``BLOCK_K`` at a time
(one group per step: ``group`` is a multiple of ``BLOCK_K``), unpacks and scales the weights in
registers and accumulates ``x @ w^T`` in float32 with ``tl.dot``; ``SPLIT_K`` > 1 splits the
inputs over programs that add into a float32 buffer, for layers with few output tiles. Runs
under ``TRITON_INTERPRET=1`` on a CPU (the tests' correctness check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # Triton ships with torch's CUDA wheels; the dequantize path needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - a CPU-only torch without Triton
    triton = None


@dataclass(frozen=True)
class TileConfig:
    """One launch shape of the kernel (what the kernel table sweeps per M and layer shape)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# Past this many rows a call dequantizes and uses cuBLAS: the kernel table's crossover lies between
# 64 rows (Triton 7.2 ms, dequantize 19.6 ms) and 736 (38.4 against 29.6); 256 is inside it.
DEQUANTIZE_ROWS = 256

# The tile shape of decoding calls per layer shape (in, out): the kernel table's pick at M = 32
# (the engine's batch) for Qwen2.5-7B's layers; other shapes get the default. One shape per layer
# for every batch size, so the compiled decoding step holds one kernel variant per layer shape.
DECODE_TILES = {(3584, 4608): TileConfig(32, 128, 128, 2), (3584, 3584): TileConfig(32, 64, 128, 1),
                (3584, 37888): TileConfig(32, 64, 128, 1), (18944, 3584): TileConfig(32, 64, 128, 2)}
DEFAULT_TILE = TileConfig(32, 64, 128, 1)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes in [0, 15] -> ``[out, in / 2]`` uint8, low nibble first."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_codes`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """w = (q - 8) s + z as a ``[out, in]`` tensor of the scale's dtype, in torch operations (the
    CPU's path and the reference; a GPU runs :func:`dequantize_triton`, one kernel)."""
    out_features = packed.shape[0]
    q = unpack_codes(packed).view(out_features, -1, group).to(scale.dtype)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(out_features, -1)


if triton is not None:

    @triton.jit
    def _w4a16_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr, M, N, K,
                      stride_xm, stride_pn, stride_sn, stride_ym,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_m < M
        col_ok = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_span = K // SPLIT_K
        for k0 in range(pid_k * k_span, (pid_k + 1) * k_span, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=row_ok[:, None], other=0.0)
            offs_p = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            p = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs_p[None, :], mask=col_ok[:, None], other=0)
            q = tl.interleave(p & 0xF, p >> 4)
            g = k0 // GROUP
            s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + offs_n * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
            w = ((q.to(tl.float32) - 8.0) * s[:, None] + z[:, None]).to(x.dtype)
            acc += tl.dot(x, tl.trans(w))
        y = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if SPLIT_K == 1:
            tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y, acc, mask=mask)

    @triton.jit
    def _dequantize_kernel(packed_ptr, scale_ptr, zero_ptr, w_ptr, N, stride_pn, stride_sn, stride_wn,
                           GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        g = tl.program_id(1)  # one group of inputs per program
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        offs_p = g * (GROUP // 2) + tl.arange(0, GROUP // 2)
        p = tl.load(packed_ptr + offs_n[:, None] * stride_pn + offs_p[None, :], mask=col_ok[:, None], other=0)
        q = tl.interleave(p & 0xF, p >> 4)
        s = tl.load(scale_ptr + offs_n * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
        z = tl.load(zero_ptr + offs_n * stride_sn + g, mask=col_ok, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * s[:, None] + z[:, None]
        offs_k = g * GROUP + tl.arange(0, GROUP)
        tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=col_ok[:, None])


def dequantize_triton(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                      block_n: int = 16) -> torch.Tensor:
    """:func:`dequantize_packed` as one Triton kernel (a program per ``block_n`` outputs and group)."""
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    weight = torch.empty(out_features, in_features, dtype=scale.dtype, device=packed.device)
    grid = (triton.cdiv(out_features, block_n), in_features // group)
    _dequantize_kernel[grid](packed, scale, zero, weight, out_features, packed.stride(0), scale.stride(0),
                             weight.stride(0), GROUP=group, BLOCK_N=block_n)
    return weight


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 config: TileConfig = TileConfig()) -> torch.Tensor:
    """``x @ w^T`` for ``x`` ``[..., in]`` (bf16 or float32) and the packed weight, by the Triton
    kernel (a GPU, or the interpreter); returns ``[..., out]`` in ``x``'s dtype."""
    if triton is None:
        raise RuntimeError("the W4A16 kernel needs Triton (shipped with torch's CUDA wheels)")
    out_features, in_features = packed.shape[0], packed.shape[1] * 2
    if group % config.block_k or in_features % (config.block_k * config.split_k):
        raise ValueError(f"in_features {in_features} and group {group} must be multiples of block_k "
                         f"{config.block_k} (times split_k {config.split_k})")
    rows = x.reshape(-1, in_features).contiguous()
    m = rows.shape[0]
    y = torch.zeros(m, out_features, dtype=torch.float32 if config.split_k > 1 else x.dtype, device=x.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(out_features, config.block_n), config.split_k)
    _w4a16_kernel[grid](rows, packed, scale, zero, y, m, out_features, in_features,
                        rows.stride(0), packed.stride(0), scale.stride(0), y.stride(0),
                        GROUP=group, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                        SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


class W4A16Linear(torch.nn.Module):
    """A linear layer whose weight stays 4-bit (codes two per byte, a scale and zero per group):
    decoding-sized calls by the Triton kernel, longer ones by dequantize + cuBLAS (see the
    module's docstring for the measurements behind :data:`DEQUANTIZE_ROWS`)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", bias)
        self.group = group
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.tile = DECODE_TILES.get((self.in_features, self.out_features), DEFAULT_TILE)
        # the kernel needs whole tiles of inputs; other layers (none in Qwen2.5's) always dequantize
        self.kernel_fits = (group % self.tile.block_k == 0
                            and self.in_features % (self.tile.block_k * self.tile.split_k) == 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, 4-bit"

    def dequantized(self) -> torch.Tensor:
        """The weight in the scales' dtype, as long calls compute it (a scratch: not kept)."""
        if self.packed.is_cuda and triton is not None:
            return dequantize_triton(self.packed, self.scale, self.zero, self.group)
        return dequantize_packed(self.packed, self.scale, self.zero, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.is_cuda and self.kernel_fits and rows <= DEQUANTIZE_ROWS:
            y = w4a16_matmul(x, self.packed, self.scale, self.zero, self.group, self.tile)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)
