"""AWQ checkpoints in the serving int4 kernel: the same weights as compressed-tensors' own
dequantization, within the rounding bound medvl/model/int4.py states, and the same model function."""


import torch
from PIL import Image

from medvl.core.workdir import Workdir
from medvl.evaluation.benchmark import load_benchmark_samples
from medvl.model.compare import build_inputs
from medvl.model.int4 import GroupInt4, dequantization_check, load_awq_model
from medvl.model.loading import load_processor
from medvl.model.quantize import quantize_awq


def test_awq_checkpoint_in_the_int4_kernel_matches_compressed_tensors_within_the_bound(phases_1_4, tiny_settings):
    folder = Workdir(phases_1_4).awq_model_dir(tiny_settings)
    model = load_awq_model(folder, tiny_settings, fuse=False)
    check = dequantization_check(folder, model)
    assert check["layers"] == 7 * model.config.text_config.num_hidden_layers  # every language-model projection
    assert check["within_bound"], {k: v for k, v in check["per_layer"].items() if v["worst_fraction_of_bound"] > 1}
    for layer in check["per_layer"].values():  # 4-bit codes plus a scale and a zero per 128 weights
        assert layer["bytes_per_weight"] < 0.6


def test_fused_awq_layers_compute_what_the_separate_layers_do(phases_1_4, tiny_settings):
    """The server fuses q/k/v and gate/up by stacking their 4-bit codes: the model's next-token
    logits are those of the unfused load (float32 CPU kernel: equal to rounding)."""
    wd = Workdir(phases_1_4)
    folder = wd.awq_model_dir(tiny_settings)
    sample = load_benchmark_samples(wd.test_images)[0]
    processor = load_processor(folder, tiny_settings)
    logits = []
    for fuse in (False, True):
        model = load_awq_model(folder, tiny_settings, fuse=fuse)
        inputs = build_inputs(processor, [Image.open(sample.image_path).convert("RGB")], [sample.prompt], "cpu")
        with torch.inference_mode():
            logits.append(model(**inputs).logits[0, -1])
    assert hasattr(model.model.language_model.layers[0].self_attn, "qkv_proj")
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_group_int4_reexpresses_only_the_zero_offset():
    """Codes q = c + 8 and zero z = -zp * s reproduce (c - zp) * s exactly in float64 terms."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    torch.manual_seed(0)
    signed = torch.randint(-8, 8, (16, 256), dtype=torch.int8)
    zero_point = torch.randint(-8, 8, (16, 2), dtype=torch.int8)
    scale = torch.rand(16, 2) * 0.01 + 1e-3
    layer = GroupInt4.from_compressed(pack_to_int32(signed, 4), scale, pack_to_int32(zero_point, 4, packed_dim=0),
                                      torch.tensor([16, 256]), 128)
    assert torch.equal(layer.codes.to(torch.int16), signed.to(torch.int16) + 8)
    expected = (signed.double() - zero_point.double().repeat_interleave(128, dim=1)) * scale.double().repeat_interleave(128, dim=1)
    assert torch.allclose(layer.dequantize().double(), expected, rtol=0, atol=1e-6)
    both = GroupInt4.cat([layer, layer])
    assert both.codes.shape == (32, 256) and torch.equal(both.dequantize()[16:], layer.dequantize())


def test_awq_calibration_leaves_no_model_alive(phases_1_2, tiny_settings, tmp_path):
    """llm-compressor's tracing would keep the calibrated model for the life of the process
    (7 GB of GPU memory at 7B, under phase 4's later loads); quantize_awq undoes that."""
    import gc

    from transformers import Qwen2_5_VLForConditionalGeneration

    done = quantize_awq(Workdir(phases_1_2).base_model_dir(tiny_settings), tmp_path / "awq", tiny_settings)
    gc.collect()
    assert done["calibration"]["documents"] == tiny_settings.quant.awq_calibration_samples
    assert not any(isinstance(o, Qwen2_5_VLForConditionalGeneration) for o in gc.get_objects())
