"""The 4-bit serving layer: its dequantize path against the former int4 kernel (torchao's) on the
tiny AWQ checkpoint, its Triton kernel against the dequantize path (Triton's interpreter on the
CPU), and round-to-nearest within its bound."""

import subprocess
import sys

import torch

from medvl.core.workdir import Workdir
from medvl.model.int4 import GroupInt4, _Checkpoint, int4_weight_only, load_awq_model
from medvl.model.w4a16 import W4A16Linear, dequantize_packed, pack_codes, unpack_codes

from conftest import REPO


def bf16_rounding_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What bf16 rounding of the weights and of the sum allows per output: 2 u |x| |w|^T."""
    return 2 * 2**-8 * (x.abs() @ weight.abs().T) + 1e-6


def test_the_dequantize_path_computes_what_the_former_int4_kernel_computed_on_the_tiny_awq_checkpoint(
        phases_1_4, tiny_settings):
    folder = Workdir(phases_1_4).awq_model_dir(tiny_settings)
    model = load_awq_model(folder, tiny_settings, fuse=False)
    checkpoint = _Checkpoint(folder)
    layers = sorted(k[: -len(".weight_packed")] for k in checkpoint.keys() if k.endswith(".weight_packed"))
    assert len(layers) == 7 * model.config.text_config.num_hidden_layers
    torch.manual_seed(0)
    worst = 0.0
    for name in layers:
        served = model.get_submodule(name.replace("model.", "model.language_model.", 1))
        assert isinstance(served, W4A16Linear)
        group = GroupInt4.from_compressed(*(checkpoint.get(f"{name}.weight_{part}")
                                            for part in ("packed", "scale", "zero_point", "shape")), 128)
        x = torch.randn(5, served.in_features)
        with torch.inference_mode():
            ours = served(x) - (served.bias if served.bias is not None else 0)
            former = torch.nn.functional.linear(x, group.to_kernel(torch.float32, "cpu"))
        bound = bf16_rounding_bound(x, group.dequantize())
        worst = max(worst, float(((ours - former).abs() / bound).max()))
        # 4-bit in memory: codes two per byte, a float32 scale and zero per 128 weights on the CPU
        assert served.packed.dtype == torch.uint8 and served.packed.numel() * 2 == group.codes.numel()
    assert worst <= 1.0, worst
    # a wrong layer is caught: the next layer's weights do not pass as this one's
    other = GroupInt4.from_compressed(*(checkpoint.get(f"{layers[1]}.weight_{part}")
                                        for part in ("packed", "scale", "zero_point", "shape")), 128)
    served = model.get_submodule(layers[0].replace("model.", "model.language_model.", 1))
    if other.codes.shape == (served.out_features, served.in_features):
        x = torch.randn(5, served.in_features)
        wrong = torch.nn.functional.linear(x, other.to_kernel(torch.float32, "cpu"))
        right = served(x) - (served.bias if served.bias is not None else 0)
        assert float(((right - wrong).abs() / bf16_rounding_bound(x, other.dequantize())).max()) > 1


def test_codes_pack_two_per_byte_and_dequantize_as_stated():
    torch.manual_seed(1)
    codes = torch.randint(0, 16, (6, 256), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (6, 128) and torch.equal(unpack_codes(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # low nibble first
    scale, zero = torch.rand(6, 2) + 0.1, torch.randn(6, 2)
    expected = GroupInt4(codes, scale, zero, 128).dequantize()
    assert torch.allclose(dequantize_packed(packed, scale, zero, 128), expected)


def test_round_to_nearest_stays_within_half_a_step_and_replaces_every_language_linear(tiny_model_dir, tiny_settings):
    from medvl.model.loading import load_model

    torch.manual_seed(2)
    weight = torch.randn(64, 256)
    layer = GroupInt4.round_to_nearest(weight, 128)
    assert layer.codes.min() >= 0 and layer.codes.max() <= 15
    step = layer.scale.repeat_interleave(128, dim=1)
    assert bool(((layer.dequantize() - weight).abs() <= step / 2 + 1e-6).all())
    model = load_model(tiny_model_dir, tiny_settings)
    linears = sum(1 for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and "visual" not in n and "lm_head" not in n)
    assert int4_weight_only(model) == linears > 0
    assert sum(isinstance(m, W4A16Linear) for m in model.modules()) == linears


KERNEL_CHECK = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from medvl.model.w4a16 import TileConfig, dequantize_packed, dequantize_triton, pack_codes, w4a16_matmul
torch.manual_seed(3)
worst = 0.0
for n, k in ((96, 256), (40, 512)):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale, zero = torch.rand(n, k // 128) * 0.02 + 1e-3, torch.randn(n, k // 128) * 0.01
    packed = pack_codes(codes)
    weight = dequantize_packed(packed, scale, zero, 128)
    assert torch.allclose(dequantize_triton(packed, scale, zero, 128), weight)
    for m in (1, 7, 33):
        x = torch.randn(m, k)
        for tile in (TileConfig(16, 32, 128, 1), TileConfig(32, 64, 128, 2), TileConfig(16, 32, 64, 2)):
            got = w4a16_matmul(x, packed, scale, zero, 128, tile)
            want = x @ weight.T
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    wrong = w4a16_matmul(x, pack_codes(15 - codes), scale, zero, 128)
    assert float((wrong - x @ weight.T).abs().max() / (x @ weight.T).abs().max()) > 0.1
print(worst)
sys.exit(0 if worst < 1e-5 else 1)
"""


def test_the_triton_kernel_computes_the_dequantize_paths_product():
    """Under Triton's interpreter (a subprocess: the mode is read when kernels are defined):
    every tile shape, split-K included, on rows that fill no tile exactly; a wrong weight fails."""
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
