"""The fused elementwise functions compute what transformers' modules compute (medvl.model.fused_ops)."""

import copy

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from medvl.model import fused_ops
from medvl.model.fusion import fuse_projections
from medvl.model.loading import load_model, load_processor
from medvl.model.vision import align_vision_mlp

# Traced by dynamo (dynamic shapes) but run eagerly: what the compiled kernels compute, checked on
# the CPU without inductor's C++ compilation.
KERNELS = {"plain": fused_ops.Kernels(None), "traced": fused_ops.Kernels("eager")}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test traces from an empty cache: other tests' compilations of the same functions (the
    compiled decoding step's, other backends, grad modes) count toward dynamo's recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name, args", [
    ("rms_norm", (torch.randn(2, 9, 64), torch.randn(64), 1e-6)),
    ("silu_gate", (torch.randn(5, 12), torch.randn(5, 12))),
    ("silu_gate_fused", (torch.randn(5, 24),)),
    ("rotary", (torch.randn(3, 4, 11, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 11, 16), torch.randn(3, 11, 16))),
    ("rotary_vision", (torch.randn(50, 4, 16), torch.randn(50, 4, 16), torch.randn(50, 16), torch.randn(50, 16))),
])
def test_each_function_traces_as_one_graph(name, args):
    """No graph break: each function is one fused graph on the GPU, not pieces with eager gaps."""
    explained = torch._dynamo.explain(getattr(fused_ops, name))(*args)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("kind", KERNELS)
@pytest.mark.parametrize("shape", [(7, 64), (2, 9, 64), (1, 640, 96)])
def test_rms_norm_matches_transformers(kind, shape):
    torch.manual_seed(0)
    norm = qwen.Qwen2_5_VLRMSNorm(shape[-1], eps=1e-6).to(torch.bfloat16)
    norm.weight.data.normal_()
    x = (torch.randn(shape) * 3).to(torch.bfloat16)
    with torch.inference_mode():  # as served
        out = KERNELS[kind].rms_norm(x, norm.weight, norm.variance_epsilon)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, norm(x))
        assert not torch.equal(out, KERNELS[kind].rms_norm(x, norm.weight.flip(0), 1e-6))  # the weight counts


@pytest.mark.parametrize("kind", KERNELS)
def test_rotary_embeddings_match_transformers(kind):
    torch.manual_seed(0)
    q, k = torch.randn(3, 4, 11, 16), torch.randn(3, 2, 11, 16)
    cos, sin = torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    for ours, theirs in zip(KERNELS[kind].rotary(q, k, cos, sin), qwen.apply_rotary_pos_emb(q, k, cos, sin), strict=True):
        assert torch.equal(ours, theirs)
    qv, kv = torch.randn(50, 4, 16, dtype=torch.bfloat16), torch.randn(50, 4, 16, dtype=torch.bfloat16)
    cv, sv = torch.randn(50, 16), torch.randn(50, 16)
    ours = KERNELS[kind].rotary_vision(qv, kv, cv, sv)
    theirs = qwen.apply_rotary_pos_emb_vision(qv, kv, cv, sv)
    assert all(torch.equal(a, b) and a.dtype == torch.bfloat16 for a, b in zip(ours, theirs, strict=True))
    assert not torch.equal(ours[0], qv)  # it rotates


@pytest.mark.parametrize("kind", KERNELS)
def test_silu_gates_match_the_mlp(kind):
    torch.manual_seed(0)
    gate, up = torch.randn(5, 12), torch.randn(5, 12)
    assert torch.equal(KERNELS[kind].silu_gate(gate, up), torch.nn.functional.silu(gate) * up)
    assert torch.equal(KERNELS[kind].silu_gate_fused(torch.cat([gate, up], -1)), torch.nn.functional.silu(gate) * up)
    assert not torch.equal(KERNELS[kind].silu_gate_fused(torch.cat([up, gate], -1)), torch.nn.functional.silu(gate) * up)


def test_the_rewritten_model_gives_the_same_logits(tiny_model_dir, tiny_settings):
    """Every RMSNorm, MLP and attention module of both towers is rewritten, and a page's logits
    (vision tower included) are unchanged, bit for bit, with the plain kernels."""
    reference = load_model(tiny_model_dir, tiny_settings)  # (the vision windows batched, as served)
    processor = load_processor(tiny_model_dir, tiny_settings)
    rewritten = copy.deepcopy(reference)
    fuse_projections(rewritten)
    align_vision_mlp(rewritten)
    count = fused_ops.fuse_elementwise(rewritten, compiled=False)
    kinds = {type(m).__name__ for m in rewritten.modules()}
    assert {"_FusedRMSNorm", "_FusedVisionMLP", "_FusedGateUpKernelMLP"} <= kinds
    assert "Qwen2_5_VLRMSNorm" not in kinds and "Qwen2_5_VLMLP" not in kinds
    layers = rewritten.config.text_config.num_hidden_layers
    blocks = rewritten.config.vision_config.depth
    # per layer and per block: two norms, the MLP, the attention; the final norm and the merger's
    assert count == 4 * layers + 4 * blocks + 2
    assert fused_ops.fuse_elementwise(rewritten, compiled=False) == count  # idempotent
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}],
                                         add_generation_prompt=True)
    page = Image.effect_noise((300, 260), 60).convert("RGB")
    inputs = processor(text=[text], images=[page], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(rewritten(**inputs).logits, reference(**inputs).logits)


def test_the_served_model_runs_the_fused_modules(engine):
    """The engine's decoder rewrites its model (plain kernels on the CPU, compiled on a GPU)."""
    kinds = {type(m).__name__ for m in engine.decoder.base.modules()}
    assert {"_FusedRMSNorm", "_FusedVisionMLP", "_FusedGateUpKernelMLP"} <= kinds
    assert fused_ops.kernels_for(None) is fused_ops.kernels_for(None)  # one set of compiled graphs per process


def test_start_up_compiles_every_tower_shape_traffic_brings(tiny_model_dir, tiny_settings):
    """After the server's warm-up (one blank page), towers of one page, of several pages in one
    call (pages waiting for the tower share one) and of other page sizes compile nothing new
    (traced by dynamo as on a GPU, run eagerly here): a compilation under traffic would stall a
    request for seconds. (A whole vision block compiled as one function failed this: its
    segments specialise on one image; docs/results/h100/README.md.)"""
    from medvl.engine.loader import build_engine, warm_up

    processor = load_processor(tiny_model_dir, tiny_settings, padding_side="left")
    engine = build_engine(load_model(tiny_model_dir, tiny_settings), processor, tiny_settings.decode)
    fused_ops.fuse_elementwise(engine.decoder.base, compiled=True, backend="eager")
    warm_up(engine)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0  # the tower and the prefill did run through dynamo
    pages = [Image.effect_noise((300, 420), 50).convert("RGB"), Image.new("RGB", (640, 480), "white"),
             Image.effect_noise((200, 200), 80).convert("RGB")]
    with torch.inference_mode():
        for images in ([pages[0]], pages, pages[1:]):
            pixels = processor.image_processor(images=images, return_tensors="pt")
            features = engine.decoder.base.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
            assert len(features.pooler_output) == len(images)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
