"""The offline stand-in loads and runs exactly like the hub snapshot."""

import json

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from medvl.medical.documents import benchmark_documents, render_document
from medvl.model.standin import meta_model


def test_standin_loads_with_auto_classes_and_generates(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"

    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "List the medications."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>List the medications.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = render_document(benchmark_documents(7)[0])
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    grid = inputs["image_grid_thw"][0]
    assert n_image_tokens == int(grid.prod()) // 4  # 2x2 merge: one token per 28x28 pixels
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8
    assert isinstance(processor.decode(out[0, inputs["input_ids"].shape[1]:]), str)


def test_standin_files_match_the_hub_layout(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "model.safetensors"):
        assert (tiny_model_dir / name).is_file(), name
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
        assert processor.tokenizer.decode([token_id]) == token
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def test_7b_random_architecture_has_8_29_billion_parameters():
    model = meta_model("7b", vocab_size=152064)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 8.29e9) / 8.29e9 < 0.01, n
    text = model.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.intermediate_size) == (28, 3584, 18944)
    assert (text.num_attention_heads, text.num_key_value_heads, text.vocab_size) == (28, 4, 152064)
    vision = model.config.vision_config
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (32, 1280, 3584)
    assert list(vision.fullatt_block_indexes) == [7, 15, 23, 31]
