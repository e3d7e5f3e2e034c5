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

The Triton kernel tiles the output ``BLOCK_M x BLOCK_N``, walks the inputs ``BLOCK_K`` at a time
(one group per step: ``group`` is a multiple of ``BLOCK_K``), unpacks and scales the weights in
registers and accumulates ``x @ w^T`` in float32 with ``tl.dot``; ``SPLIT_K`` > 1 splits the
inputs over programs that add into a float32 buffer, for layers with few output tiles. Runs
under ``TRITON_INTERPRET=1`` on a CPU (the tests' correctness check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` codes in [0, 15] -> ``[out, in / 2]`` uint8, low nibble first."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_codes`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """w = (q - 8) s + z as a ``[out, in]`` tensor of the scale's dtype: the prefill path's
    scratch weight (compiled, it is one elementwise kernel)."""
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
