"""The fp8 served form (W8A8, float8 e4m3; medvl/model/fp8.py): its rounding is e4m3's and no
more, a row's scale is its own (one outlier costs no other row), the tiny model made fp8 at load
answers through the engine close to full precision, and on a GPU with FP8 tensor cores the
kernel computes what the CPU's emulation does."""

import pytest
import torch

from medvl.engine.loader import build_engine
from medvl.engine.scheduler import SamplingParams
from medvl.medical.documents import benchmark_documents, render_document
from medvl.medical.prompts import BENCHMARK_PROMPTS
from medvl.model.compare import build_inputs, relative_l2
from medvl.model.forms import load_in_form
from medvl.model.fp8 import FP8_MAX, Fp8Linear, fp8_dynamic, fp8_kernel_available, quantize_rows
from medvl.model.loading import load_model, load_processor

E4M3_HALF_ULP = 2**-4  # 3 mantissa bits: a normal value is rounded by at most 1/16 of itself


def test_rows_are_rounded_to_e4m3_against_their_own_largest_value():
    torch.manual_seed(0)
    t = torch.randn(6, 256)
    t[2] *= 1e5  # one row of large values
    t[4] = 0  # and one of zeros
    codes, scale = quantize_rows(t)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    assert torch.equal(codes.float().abs().amax(dim=1)[[0, 1, 2, 3, 5]], torch.full((5,), FP8_MAX))
    back = codes.float() * scale
    assert torch.equal(back[4], torch.zeros(256))
    # a value well inside e4m3's normal range is within half an ulp; tiny ones within the subnormal step
    bound = E4M3_HALF_ULP * t.abs() + scale * 2**-9
    assert bool(((back - t).abs() <= bound).all())
    # one shared scale for every row would have sent the other rows' values to zero and subnormals
    shared = (t / (t.abs().max() / FP8_MAX)).to(torch.float8_e4m3fn).float() * (t.abs().max() / FP8_MAX)
    assert float((back[0] - t[0]).norm() / t[0].norm()) < 0.05 < 0.3 < float((shared[0] - t[0]).norm() / t[0].norm())


def test_an_fp8_layer_computes_the_quantized_product_close_to_the_full_precision_one():
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = Fp8Linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (1, 96)
    x = torch.randn(3, 5, 256)
    got = layer(x)
    assert got.shape == (3, 5, 96)
    want = linear(x).detach()
    error = float((got - want).norm() / want.norm())
    assert 1e-3 < error < 0.05, error  # rounded (not the bf16 product), but by e4m3's error only
    codes, scale = quantize_rows(x.reshape(-1, 256))
    by_hand = (codes.float() * scale) @ (layer.weight.float() * layer.weight_scale.t()).t() + linear.bias.detach()
    assert torch.allclose(got.reshape(-1, 96), by_hand, atol=1e-5, rtol=1e-5)


def test_the_tiny_model_made_fp8_at_load_answers_closer_to_full_precision_than_int4(tiny_model_dir, tiny_settings):
    full = load_model(tiny_model_dir, tiny_settings)
    layers = [n for n, m in full.named_modules()
              if isinstance(m, torch.nn.Linear) and "visual" not in n and "lm_head" not in n]
    assert fp8_dynamic(load_model(tiny_model_dir, tiny_settings)) == len(layers) > 0
    served = load_in_form(tiny_model_dir, tiny_settings, "fp8")  # fused q/k/v and gate/up, then fp8
    assert sum(isinstance(m, Fp8Linear) for m in served.modules()) == 4 * full.config.text_config.num_hidden_layers
    assert not any(isinstance(m, Fp8Linear) for n, m in served.named_modules() if "visual" in n or "lm_head" in n)

    processor = load_processor(tiny_model_dir, None)
    doc = benchmark_documents(1234, 1)[0]
    page, prompt = render_document(doc), BENCHMARK_PROMPTS[doc.kind]
    inputs = build_inputs(processor, [page], [prompt], torch.device("cpu"))
    with torch.inference_mode():
        reference = full(**inputs).logits[0, -1].float()
        fp8 = relative_l2(served(**inputs).logits[0, -1].float(), reference)
        int4 = relative_l2(load_in_form(tiny_model_dir, tiny_settings, "int4")(**inputs).logits[0, -1].float(), reference)
    # the tiny random model amplifies any rounding (int4's moves its logits by 0.71): fp8 rounds, and by far less
    assert 1e-4 < fp8 < int4 / 2, (fp8, int4)

    engine = build_engine(served, processor, tiny_settings.decode, slots=2)
    answer = engine.generate(engine.prepare(page, prompt), SamplingParams(12, ignore_eos=True))
    assert len(answer.token_ids) == 12


@pytest.mark.skipif(not (torch.cuda.is_available() and fp8_kernel_available(torch.device("cuda"))),
                    reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")
def test_the_fp8_kernel_computes_what_the_emulation_does():
    torch.manual_seed(2)
    layer = Fp8Linear(torch.nn.Linear(512, 256, bias=True).cuda().bfloat16())
    assert layer.use_kernel
    for rows in (1, 7, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        codes, scale = quantize_rows(x)
        want = layer.emulated(codes, scale) + layer.bias.float()
        got = layer(x).float()
        assert float((got - want).abs().max() / want.abs().max()) < 2**-7  # bf16 output rounding
