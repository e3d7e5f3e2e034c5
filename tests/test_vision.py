"""The vision tower's rewrites compute what transformers' tower computes (tiny model, CPU)."""

import torch
from PIL import Image

from medvl.model.loading import load_model, load_processor
from medvl.model.vision import align_vision_mlp, batch_window_attention, segmented_attention


def test_segmented_attention_is_attention_within_each_segment():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 9, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 4, 9])  # an empty segment too, as windows at an image's edge can be
    got = segmented_attention(query, key, value, cu, 0.3)
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, a:b], key[:, a:b], value[:, a:b], scale=0.3).transpose(0, 1) for a, b in ((0, 4), (4, 9))])
    torch.testing.assert_close(got, expected)


def test_batched_windows_and_padded_mlp_give_the_towers_output(tiny_model_dir, tiny_settings):
    """Two pages of different sizes (windows and full-attention segments of different lengths):
    the tower with one SDPA call per layer and its MLP padded to an aligned width returns what
    transformers' per-window tower returns."""
    model = load_model(tiny_model_dir, tiny_settings, batched_vision=False)
    processor = load_processor(tiny_model_dir, tiny_settings)
    images = [Image.new("RGB", (448, 300), "white"), Image.effect_noise((200, 420), 60).convert("RGB")]
    pixels = processor.image_processor(images=images, return_tensors="pt")
    visual = model.model.visual
    with torch.inference_mode():
        expected = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
        assert batch_window_attention(model) == visual.config.depth
        assert align_vision_mlp(model, multiple=48) == visual.config.depth  # tiny's 64 -> 96
        assert visual.blocks[0].mlp.gate_proj.out_features == 96
        got = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
