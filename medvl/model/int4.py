"""Every 4-bit served weight, and loading AWQ checkpoints into it.

Two sources of int4 weights serve through one module, :class:`medvl.model.w4a16.W4A16Linear`
(codes two per byte, a scale and a zero per group; a Triton W4A16 kernel for decoding steps,
dequantize + cuBLAS for prefills; the measurements that chose it are in that module):
- round-to-nearest at load (:func:`int4_weight_only`), from a full-precision checkpoint;
- AWQ (:func:`load_awq_model`), from the compressed-tensors checkpoint phase 4 writes with
  llm-compressor, whose codes carry over unchanged.
torchao's tinygemm layout (:meth:`GroupInt4.to_kernel`), which served both until the kernel
table showed it 3-6x slower than bf16 at the engine's batch and 23x on a page's prefill, stays
as a candidate of ``bench/int4_kernels.py`` and the reference of the tests.

Why AWQ's codes carry over: the served layout (tinygemm's convention) stores 4-bit codes q in
[0, 15] with a scale s and a *float* zero z per group and computes w = (q - 8) s + z. compressed-tensors stores signed codes
c and zero points zp in [-8, 7] with w = (c - zp) s. So q = c + 8 (the same 16 levels,
shifted) and z = -zp s: only the zero offset is re-expressed, rounded once to the compute
dtype. The rounding bound (``tests/test_int4.py`` checks it against compressed-tensors' own
dequantization): with u the unit roundoff of the weights' dtype (2^-24 float32, 2^-8 bf16),

    |w_kernel - w_compressed_tensors| <= 3 u s (|q - 8| + |zp|)

per element: one rounding each for (q - 8) s, for z = -zp s and for their sum, against one
for (c - zp) s, each at most u times a magnitude bounded by s (|q - 8| + |zp|). The served
weights are read back as the long-call path dequantizes them (:func:`dequantization_check`); in
bf16 the scale and zero are rounded once more, so a GPU's bound is 4 u s (|q - 8| + |zp|).
Weights stay 4-bit in memory: codes packed two per byte plus a scale and zero per 128 inputs.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medvl.core.settings import Settings
from medvl.model.fusion import FUSED_PROJECTIONS, fuse_projections
from medvl.model.loading import attention_implementation, half_dtype
from medvl.model.memory import tensor_bytes
from medvl.model.vision import batch_window_attention
from medvl.model.w4a16 import W4A16Linear, pack_codes

log = logging.getLogger(__name__)

TILE_IN_FEATURES = 1024  # tinygemm pads in_features to this multiple (as torchao's from_hp does)
TILE_OUT_FEATURES = 8
INNER_K_TILES = 8


def language_linear(module: torch.nn.Module, name: str) -> bool:
    """The layers every 4-bit form quantizes: the language model's linear layers (the vision
    tower is small and sensitive, lm_head holds the 152 k-way output: both stay full precision)."""
    return isinstance(module, torch.nn.Linear) and "visual" not in name and "lm_head" not in name


@dataclass
class GroupInt4:
    """One linear layer's 4-bit weight in tinygemm's convention: ``codes`` q in [0, 15]
    ([out, in], uint8), ``scale`` s and float ``zero`` z per group of ``group_size`` inputs
    ([out, in / group_size]); the weight is w = (q - 8) s + z."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @classmethod
    def from_compressed(cls, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        shape: torch.Tensor, group_size: int) -> GroupInt4:
        """From a compressed-tensors ``pack-quantized`` asymmetric layer (weight_packed,
        weight_scale, weight_zero_point, weight_shape)."""
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        out_features, in_features = (int(n) for n in shape)
        signed = unpack_from_int32(packed, 4, torch.Size((out_features, in_features)))
        zp = unpack_from_int32(zero_point, 4, torch.Size((out_features, scale.shape[-1])), packed_dim=0)
        return cls(codes=(signed.to(torch.int16) + 8).to(torch.uint8), scale=scale,
                   zero=-zp.to(torch.float32) * scale.to(torch.float32), group_size=group_size)

    @classmethod
    def cat(cls, parts: list[GroupInt4]) -> GroupInt4:
        """Layers side by side (their outputs concatenated), as the fused q/k/v and gate/up
        projections are: groups run along the inputs, so rows simply stack."""
        return cls(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.zero for p in parts]), parts[0].group_size)

    @classmethod
    def round_to_nearest(cls, weight: torch.Tensor, group_size: int) -> GroupInt4:
        """Round-to-nearest asymmetric int4 per group: q = round((w - min) / s) with
        s = (max - min) / 15, so w ~ q s + min = (q - 8) s + z with z = min + 8 s."""
        out_features, in_features = weight.shape
        grouped = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        codes = ((grouped - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
        return cls(codes.reshape(out_features, in_features), scale, low + 8 * scale, group_size)

    def to_module(self, dtype: torch.dtype, device: torch.device | str,
                  bias: torch.Tensor | None = None) -> W4A16Linear:
        """The served layer: codes packed two per byte, scale and zero in ``dtype``."""
        return W4A16Linear(pack_codes(self.codes).to(device), self.scale.to(device=device, dtype=dtype),
                           self.zero.to(device=device, dtype=dtype), self.group_size,
                           None if bias is None else bias.to(device=device, dtype=dtype))

    def dequantize(self) -> torch.Tensor:
        """w = (q - 8) s + z in float32 (the reference the kernel is checked against)."""
        out_features, in_features = self.codes.shape
        grouped = self.codes.to(torch.float32).view(out_features, -1, self.group_size) - 8
        weight = grouped * self.scale.to(torch.float32)[..., None] + self.zero[..., None]
        return weight.view(out_features, in_features)

    def to_kernel(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """The weight as torchao's tinygemm tensor (a GPU's tiles, or a CPU's layout): the former
        serving kernel, kept as the kernel table's candidate and the tests' reference."""
        from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

        out_features, in_features = self.codes.shape
        block = [1, self.group_size]
        scale, zero = self.scale.to(dtype), self.zero.to(dtype)
        if torch.device(device).type == "cuda":
            from torchao.quantization import Int4TilePackedTo4dTensor

            dtype = torch.bfloat16  # tinygemm's only activation type on a GPU
            scale, zero = scale.to(dtype), zero.to(dtype)
            rows = -out_features % TILE_OUT_FEATURES
            cols = -in_features % TILE_IN_FEATURES
            # Padding groups decode to 0 (q = 8, z = 0); the kernel pads activations with zeros too.
            codes = torch.nn.functional.pad(self.codes.to(torch.int32), (0, cols, 0, rows), value=8).to(device)
            scale = torch.nn.functional.pad(scale, (0, cols // self.group_size, 0, rows), value=1).to(device)
            zero = torch.nn.functional.pad(zero, (0, cols // self.group_size, 0, rows)).to(device)
            pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            qdata = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES)
            return Int4TilePackedTo4dTensor(qdata, pack_tinygemm_scales_and_zeros(scale, zero, dtype), block,
                                            torch.Size((out_features, in_features)))
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

        qdata = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes.to(torch.int32).contiguous(), 1)
        return Int4OpaqueTensor(qdata, pack_tinygemm_scales_and_zeros(scale, zero, dtype), block,
                                torch.Size((out_features, in_features)))


def int4_weight_only(model: Any, group_size: int = 128) -> int:
    """Round-to-nearest int4 of the language model's linear layers, in place: each becomes a
    :class:`W4A16Linear` (4-bit in memory; bf16 scales on a GPU, float32 on a CPU).

    Why not bitsandbytes for serving: NF4 dequantizes every weight on every decoding step in
    eager kernels and cannot be captured in a CUDA graph, so batch-1 decoding is slower than
    bf16 (27 vs 46 tokens/s measured on an H100). NF4 stays the format for QLoRA. Returns the
    number of layers quantized.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if language_linear(module, name):
            layer = GroupInt4.round_to_nearest(module.weight, group_size)
            dtype = torch.bfloat16 if module.weight.is_cuda else module.weight.dtype
            replace_module(model, name, layer.to_module(dtype, module.weight.device, module.bias))
            count += 1
    return count


def replace_module(model: Any, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` is (a served form swapping a layer)."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


# --------------------------------------------------------------------------- AWQ checkpoints


class AwqFormatError(ValueError):
    """The folder is not a compressed-tensors W4A16 checkpoint this loader handles."""


def awq_group_size(quantization_config: dict[str, Any]) -> int:
    """Check the checkpoint is what the loader handles (pack-quantized, 4-bit int, asymmetric,
    per group) and return its group size; anything else is refused with the reason."""
    problems = []
    if quantization_config.get("quant_method") != "compressed-tensors":
        problems.append(f"quant_method {quantization_config.get('quant_method')!r} (want compressed-tensors)")
    groups = list(quantization_config.get("config_groups", {}).values())
    if len(groups) != 1:
        problems.append(f"{len(groups)} config groups (want 1)")
    else:
        weights = groups[0].get("weights") or {}
        want = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group"}
        problems += [f"weights.{k} {weights.get(k)!r} (want {v!r})" for k, v in want.items() if weights.get(k) != v]
        if groups[0].get("format", quantization_config.get("format")) != "pack-quantized":
            problems.append("format is not pack-quantized")
    if problems:
        raise AwqFormatError("not an AWQ W4A16 checkpoint: " + "; ".join(problems))
    return int(groups[0]["weights"]["group_size"])


class _Checkpoint:
    """The tensors of a safetensors checkpoint, read on demand, under either key layout
    (the saved ``model.layers.*`` / ``visual.*`` or transformers 5's ``model.language_model.*``)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
        self._handles = [safe_open(str(folder / name), "pt") for name in files]
        self._where = {key: h for h in self._handles for key in h.keys()}

    def key(self, model_name: str) -> str | None:
        for candidate in (model_name, model_name.replace("model.language_model.", "model.", 1),
                          model_name.replace("model.visual.", "visual.", 1)):
            if candidate in self._where:
                return candidate
        return None

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)



def _sources(module_name: str) -> list[str]:
    """The saved layers a model layer is made of: itself, or the parts of a fused projection."""
    parent, _, leaf = module_name.rpartition(".")
    return [f"{parent}.{part}" for part in FUSED_PROJECTIONS[leaf]] if leaf in FUSED_PROJECTIONS else [module_name]


def load_awq_model(model_dir: Path, settings: Settings, fuse: bool = True, device: str | None = None) -> Any:
    """An AWQ checkpoint (compressed-tensors W4A16) as a model whose language-model layers run
    the int4 kernel; 4-bit in memory, never decompressed (transformers' own loader would
    decompress it to full precision). ``fuse`` fuses q/k/v and gate/up first, as the server's
    decoder wants (their 4-bit codes are stacked, unchanged)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        raise AwqFormatError(f"{model_dir} has no quantization_config: not an AWQ checkpoint")
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    group_size = awq_group_size(quant)
    del config.quantization_config
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = half_dtype()[0] if device == "cuda" else torch.float32
    with init_empty_weights():  # parameters on "meta"; buffers (rotary frequencies) real
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype,
                                                        attn_implementation=attention_implementation(settings))
    if fuse:
        fuse_projections(model, skeleton=True)
    checkpoint = _Checkpoint(model_dir)
    missing, quantized = [], {}
    for name, param in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        parts = _sources(module_name)
        packed = [checkpoint.key(f"{p}.weight_packed") for p in parts] if attr == "weight" else [None]
        if all(packed):  # unpacked where they will live: a 7B loads in 2.7 s on an H100 (37.6 s unpacked on its CPU)
            layers = [GroupInt4.from_compressed(*(checkpoint.get(k[:-6] + part).to(device)
                                                  for part in ("packed", "scale", "zero_point")),
                                                checkpoint.get(k[:-6] + "shape"), group_size) for k in packed]
            quantized[module_name] = GroupInt4.cat(layers)
            continue
        keys = [checkpoint.key(f"{p}.{attr}") for p in parts]
        if not all(keys):
            missing.append(name)
            continue
        tensor = torch.cat([checkpoint.get(k) for k in keys]).to(device=device, dtype=param.dtype)
        model.get_submodule(module_name).register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=False))
    weights_dtype = torch.bfloat16 if device == "cuda" else dtype
    for module_name, layer in quantized.items():  # biases (q/k/v have them) were loaded above
        replace_module(model, module_name, layer.to_module(weights_dtype, device, model.get_submodule(module_name).bias))
    if missing == ["lm_head.weight"] and config.get_text_config().tie_word_embeddings:
        model.tie_weights()
    elif missing:
        raise AwqFormatError(f"{model_dir}: {len(missing)} weights missing, e.g. {missing[:3]}")
    model.to(device)  # the buffers
    if (model_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    batch_window_attention(model)
    model.eval()
    log.info("loaded AWQ checkpoint %s: %d int4 layers (group %d) on %s", model_dir, len(quantized), group_size,
             device)
    return model


def served_weight(layer: W4A16Linear) -> torch.Tensor:
    """The weight a served layer multiplies by, as its long calls dequantize it (a GPU's Triton
    kernel, a CPU's torch operations; the decoding kernel is checked against this path in
    ``tests/test_w4a16.py`` and on the GPU by ``bench/int4_kernels.py``)."""
    with torch.inference_mode():
        return layer.dequantized().float().cpu()


def dequantization_check(folder: Path, model: Any, limit: int | None = None) -> dict[str, Any]:
    """Each int4 layer of ``model`` (loaded unfused from the AWQ checkpoint ``folder``; the
    first ``limit`` in checkpoint order, or all) against compressed-tensors' own dequantization
    of the saved layer, within the module's stated bound; returns the worst error as a
    fraction of its bound and the layers checked."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(next(iter(config["config_groups"].values())))
    group = scheme.weights.group_size
    checkpoint = _Checkpoint(folder)
    layers = sorted(k[: -len(".weight_packed")] for k in checkpoint.keys() if k.endswith(".weight_packed"))[:limit]
    worst, results = 0.0, {}
    for layer in layers:
        state = {name: checkpoint.get(f"{layer}.{name}")
                 for name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
        reference = PackedQuantizationCompressor.decompress(state, scheme)["weight"].float()
        linear = model.get_submodule(layer.replace("model.", "model.language_model.", 1))
        kernel = served_weight(linear)
        compute = linear.scale.dtype
        roundings = 4 if compute == torch.bfloat16 else 3
        codes = unpack_from_int32(state["weight_packed"], 4, reference.shape).float() + 8
        zero_point = unpack_from_int32(state["weight_zero_point"], 4, (reference.shape[0], reference.shape[1] // group),
                                       packed_dim=0).float().repeat_interleave(group, dim=1)
        scale = state["weight_scale"].float().repeat_interleave(group, dim=1)
        bound = roundings * (torch.finfo(compute).eps / 2) * scale * ((codes - 8).abs() + zero_point.abs())
        ratio = float(((kernel - reference).abs() / bound.clamp_min(torch.finfo(torch.float32).tiny)).max())
        results[layer] = {"max_abs_error": float((kernel - reference).abs().max()), "worst_fraction_of_bound": ratio,
                          "bytes_per_weight": sum(tensor_bytes(t) for t in (linear.packed, linear.scale, linear.zero))
                                              / reference.numel()}
        worst = max(worst, ratio)
    return {"layers": len(layers), "worst_fraction_of_bound": worst, "within_bound": worst <= 1.0,
            "compute_dtype": str(compute), "per_layer": results}
