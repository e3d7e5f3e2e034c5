"""Phase 6: the label mask, LoRA placement, sample lengths, the token-mean loss, merging, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from medvl.core.settings import load_settings
from medvl.core.workdir import Workdir
from medvl.model.loading import load_processor
from medvl.pipeline.gates import PHASES, check_phase
from medvl.training.trainer import (
    IGNORE_INDEX,
    ConversationDataset,
    StepTimer,
    TruncationError,
    VisionChatCollator,
    answer_only_loss,
    check_trainable,
    load_for_training,
    make_trainer,
    token_count,
    training_arguments,
)

from conftest import REPO


@pytest.fixture(scope="module")
def processor(tiny_model_dir, tiny_settings):
    return load_processor(tiny_model_dir, tiny_settings, padding_side="right")


@pytest.fixture()
def image_row(tmp_path):
    Image.new("RGB", (112, 56), "white").save(tmp_path / "page.png")  # 4x2 patches -> 2 visual tokens
    return tmp_path


def test_label_mask_on_a_two_turn_conversation_with_an_image(processor, image_row):
    row = {"id": "two-turn", "image": "page.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name the drug."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Metformin"}]},
        {"role": "user", "content": [{"type": "text", "text": "And the dose?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "500 mg BID"}]},
    ]}
    batch = VisionChatCollator(processor, 512, image_row)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    tok = processor.tokenizer

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    # Rebuild the exact token sequence piece by piece and mark what must be trained.
    image_tokens = int(batch["image_grid_thw"][0].prod()) // 4
    pieces = [
        (encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"), False),
        ([tok.convert_tokens_to_ids("<|image_pad|>")] * image_tokens, False),
        (encode("<|vision_end|>Name the drug.<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode("Metformin<|im_end|>"), True),
        (encode("\n<|im_start|>user\nAnd the dose?<|im_end|>\n<|im_start|>assistant\n"), False),
        (encode("500 mg BID<|im_end|>"), True),
        (encode("\n"), False),
    ]
    expected_ids = [t for piece, _ in pieces for t in piece]
    expected_labels = [t if trained else IGNORE_INDEX for piece, trained in pieces for t in piece]
    assert ids == expected_ids
    assert labels == expected_labels
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert tok.decode([ids[i] for i in trained]) == "Metformin<|im_end|>500 mg BID<|im_end|>"


def test_padding_is_masked_and_images_are_stacked(processor, image_row):
    short = {"id": "a", "image": "page.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "OK"}]}]}
    long = {**short, "id": "b", "messages": [short["messages"][0], {"role": "assistant", "content": [
        {"type": "text", "text": "Lisinopril 10 mg PO QD and Atorvastatin 40 mg PO QHS"}]}]}
    batch = VisionChatCollator(processor, 512, image_row)([short, long])
    padded = batch["attention_mask"][0] == 0
    assert padded.any() and (batch["labels"][0][padded] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())


def conversation_row(sample_id, image, answer, prompt="Read it."):
    return {"id": sample_id, "image": image, "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def test_token_count_matches_the_collator(processor, tmp_path):
    """Phase 5 measures lengths without processing pixels; they must be the collator's."""
    sizes = [(112, 56), (448, 448), (1000, 1294), (640, 200)]
    rows = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, "white").save(tmp_path / f"p{i}.png")
        rows.append(conversation_row(str(i), f"p{i}.png", "Aspirin 81 mg PO QD. " * (i + 1)))
    collator = VisionChatCollator(processor, 4096, tmp_path)
    for row, size in zip(rows, sizes, strict=True):
        encoded = collator.encode(row)
        total, trained = token_count(processor, row["messages"], size)
        assert total == encoded["input_ids"].numel()
        assert trained == int((encoded["labels"] != IGNORE_INDEX).sum())


def test_a_sample_longer_than_max_length_is_refused_never_cut(processor, tmp_path):
    Image.new("RGB", (448, 448), "white").save(tmp_path / "big.png")  # 256 visual tokens
    row = conversation_row("too-long", "big.png", "Aspirin 81 mg PO QD")
    total, _ = token_count(processor, row["messages"], (448, 448))
    with pytest.raises(TruncationError, match="phase 5 drops"):
        VisionChatCollator(processor, total - 1, tmp_path)([row])
    assert VisionChatCollator(processor, total, tmp_path)([row])["input_ids"].shape[1] == total


def test_too_long_samples_are_counted_once_and_none_reach_dataloader_workers(processor, tmp_path):
    """The count is made once, before training (phase 5), not in the collator, which runs in
    worker processes on a GPU (their counts never reach the main process) and every epoch."""
    import random

    from medvl.training import data

    pages = [Image.new("RGB", (112 + 28 * i, 112), "white") for i in range(6)]
    samples = [data.Sample(f"s{i}", "synthetic", data.png_bytes(page), "Read it.", "Metformin 500 mg BID. " * (1 + 12 * (i % 3)),
                           f"text {i}") for i, page in enumerate(pages)]
    lengths = [token_count(processor, data.conversation(s, "")["messages"], p.size)[0]
               for s, p in zip(samples, pages, strict=True)]
    max_length = sorted(lengths)[3]  # exactly two samples are longer
    kept, report = data.drop_too_long(samples, processor, max_length)
    assert report["too_long"] == 2 == sum(length > max_length for length in lengths)
    assert report["too_long_by_source"] == {"synthetic": 2} and len(kept) == 4
    rows = data.write_splits({"train": kept}, tmp_path / "formatted")["train"]
    random.Random(0).shuffle(rows)
    collator = VisionChatCollator(processor, max_length, tmp_path / "formatted")
    loader = torch.utils.data.DataLoader(rows, batch_size=2, num_workers=2, collate_fn=collator)
    seen = 0
    for _epoch in range(2):
        for batch in loader:
            assert batch["input_ids"].shape[1] <= max_length
            ends = batch["attention_mask"].sum(dim=1) - 2  # each row's closing <|im_end|> (then "\n")
            assert all(int(batch["labels"][r, e]) == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
                       for r, e in enumerate(ends))
            seen += batch["input_ids"].shape[0]
    assert seen == 2 * len(kept)


def test_lora_sits_on_the_language_model_only_and_vision_is_frozen(tiny_model_dir):
    qlora = load_settings("tiny", ["train.quantize_4bit=true"])
    model = load_for_training(tiny_model_dir, qlora)
    counts = check_trainable(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "visual" not in n for n in trainable)
    assert not any("visual" in n and "lora_" in n for n, _ in model.named_modules())
    assert all(not p.requires_grad for n, p in model.named_parameters() if "visual" in n)
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    layers = model.base_model.model.config.text_config.num_hidden_layers
    assert counts["lora_modules"] == 7 * layers
    # The quantized base: every language-model projection is 4-bit.
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert four_bit and all("visual" not in n for n in four_bit)


def test_lora_output_head_adds_the_head_and_merges_into_it(tiny_model_dir, processor, image_row, tmp_path):
    """train.lora_output_head wraps lm_head as well as the projections (never the vision tower),
    the answer-only loss (lm_head on the kept positions) trains the head's LoRA, and the merge
    writes its update into lm_head's weight; without it lm_head is left alone."""
    from safetensors.torch import load_file

    from medvl.evaluation.evaluate import merge_adapter

    plain = load_for_training(tiny_model_dir, load_settings("tiny"))
    assert not any(n.startswith("lm_head") or ".lm_head." in n for n, p in plain.named_parameters() if p.requires_grad)
    with_head = load_settings("tiny", ["train.lora_output_head=true"])
    model = adapter_with_random_b(tiny_model_dir, with_head)
    counts = check_trainable(model)
    assert counts["lora_modules"] == 7 * model.base_model.model.config.text_config.num_hidden_layers + 1
    head = [n for n, p in model.named_parameters() if p.requires_grad and "lm_head" in n]
    assert sorted(n.split("lora_")[1].split(".")[0] for n in head) == ["A", "B"]
    row = {"id": "x", "image": "page.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Aspirin 81 mg"}]}]}
    batch = VisionChatCollator(processor, 512, image_row)([row])
    labels = batch.pop("labels")
    loss, _ = answer_only_loss(model, batch, labels)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lm_head" in n)
    model.save_pretrained(tmp_path / "adapter")
    processor.save_pretrained(tmp_path / "adapter")
    merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged")
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"].to(before["lm_head.weight"].dtype))


def test_loss_only_counts_answer_tokens(tiny_model_dir, tiny_settings, processor, image_row):
    """Changing a prompt token changes the input but not which tokens are scored."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    row = {"id": "x", "image": "page.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Aspirin 81 mg"}]}]}
    batch = VisionChatCollator(processor, 512, image_row)([row])
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits[0, :-1]
        target = batch["labels"][0, 1:]
        keep = target != IGNORE_INDEX
        manual = torch.nn.functional.cross_entropy(logits[keep], target[keep])
    assert torch.allclose(out.loss, manual, atol=1e-5)
    assert int(keep.sum()) == len(processor.tokenizer("Aspirin 81 mg<|im_end|>", add_special_tokens=False)["input_ids"])


def test_answer_only_loss_equals_the_full_loss_and_its_gradients(tiny_model_dir, tiny_settings, processor,
                                                                  image_row):
    """Logits on the trained positions only: same loss and same LoRA gradients as the full
    causal-LM loss, on a batch whose rows have answers of different lengths and positions."""
    torch.manual_seed(0)
    model = load_for_training(tiny_model_dir, tiny_settings).eval()  # no LoRA dropout: comparable runs
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter a non-trivial value
            torch.nn.init.normal_(param, std=0.05)
    rows = [{"id": str(i), "image": "page.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
        for i, (prompt, answer) in enumerate([("Read it.", "Aspirin 81 mg daily"),
                                              ("List every medication on this page.", "None")])]
    batch = VisionChatCollator(processor, 512, image_row)(rows)
    labels = batch.pop("labels")

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads(lambda: model(**batch, labels=labels).loss)
    fast, fast_grads = loss_and_grads(lambda: answer_only_loss(model, batch, labels)[0])
    assert torch.allclose(full, fast, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(grad, fast_grads[name], rtol=1e-4, atol=1e-6), name
    kept = answer_only_loss(model, batch, labels)[1].logits.shape[1]
    assert kept < labels.shape[1] / 2  # the point: most positions never reach lm_head


def test_phase6_trains_and_the_loss_falls(phases_1_6, tiny_settings):
    wd = Workdir(phases_1_6)
    assert check_phase(6, wd, tiny_settings) == []
    metrics = json.loads(wd.bench("training_metrics").read_text())
    assert metrics["final_loss"] < metrics["initial_loss"]
    assert metrics["eval_loss_curve"][-1]["eval_loss"] < metrics["eval_loss_curve"][0]["eval_loss"]
    assert metrics["peak_memory_mb"] > 0
    steady, whole = metrics["steady_state"], metrics["whole_run"]
    assert steady["steps"] == metrics["global_step"] - StepTimer.WARMUP_STEPS and steady["tokens_per_s"] > 0
    assert metrics["evaluation"]["passes"] >= 1 and metrics["checkpoint_saving"]["saves"] >= 1
    # Steady steps exclude warm-up, evaluation and saving: they add up to less than the whole run.
    assert steady["seconds_per_step"] * steady["steps"] + metrics["evaluation"]["seconds"] < whole["seconds"]
    assert metrics["length_check"]["too_long"] == 0
    events = list((wd.logs / "tensorboard").glob("events.out.tfevents.*"))
    assert events and metrics["curves"]["tensorboard_dir"] == str(wd.logs / "tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(wd.logs / "tensorboard")).Reload().Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/step_tokens_per_s",
            "eval/loss"} <= set(tags)
    adapter = wd.adapter_dir(tiny_settings)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == tiny_settings.train.lora_r and "visual" in config["target_modules"]
    processor_config = json.loads((adapter / "processor_config.json").read_text())
    size = processor_config["image_processor"]["size"]
    assert (size["shortest_edge"], size["longest_edge"]) == (tiny_settings.model.min_pixels,
                                                             tiny_settings.model.max_pixels)


def test_killed_training_resumes_from_its_last_checkpoint(phases_1_5, tmp_path):
    import shutil

    wd = tmp_path / "wd"
    shutil.copytree(phases_1_5, wd)
    overrides = ["--set", "train.save_steps=8", "--set", "train.max_steps=32", "--set", "train.eval_steps=100",
                 "--set", "train.quantize_4bit=true"]  # the QLoRA path, killed and resumed
    script = PHASES[6].script_path
    cmd = [sys.executable, str(script), "--workdir", str(wd), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ckpt = wd / "models" / "tiny-qwen25-vl-medical-lora-checkpoints"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (ckpt / "checkpoint-16" / "trainer_state.json").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckpt / "checkpoint-16").is_dir(), "no checkpoint appeared before the kill"
    assert not (wd / "benchmarks" / "training_metrics.json").exists()  # it really died mid-run

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from checkpoint-" in done.stderr
    metrics = json.loads((wd / "benchmarks" / "training_metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 16
    assert metrics["global_step"] == 32
    assert metrics["steps_this_run"] == 32 - metrics["resumed_from_step"]
    steps = [point["step"] for point in metrics["loss_curve"]]
    # One continuous curve: history from before the kill, then later steps, no restart at 1.
    assert steps == sorted(set(steps)) and steps[0] == 1
    assert any(step <= metrics["resumed_from_step"] for step in steps)
    assert any(step > metrics["resumed_from_step"] for step in steps)

    # Forced again with the same settings: the finished run is kept, not trained a step past it.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint-32 finished the run" in again.stderr
    rerun = json.loads((wd / "benchmarks" / "training_metrics.json").read_text())
    assert rerun["global_step"] == 32 and rerun["steps_this_run"] == 0
    assert rerun["loss_curve"] == metrics["loss_curve"]


def adapter_with_random_b(tiny_model_dir, settings):
    torch.manual_seed(0)
    model = load_for_training(tiny_model_dir, settings)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter a non-trivial value
            torch.nn.init.normal_(param, std=0.05)
    return model


def test_grad_accumulation_matches_full_batch(tiny_model_dir, processor, image_row, tmp_path):
    """Through the real Trainer: two micro-batches of different answer lengths, accumulated,
    give the gradient of one batch holding both (the loss is a token mean over the optimizer
    step, not a mean of per-micro-batch means)."""
    settings = load_settings("tiny", ["train.lora_dropout=0", "train.max_steps=1", "train.report_to=none"])
    answers = ["None", "Lisinopril 10 mg PO QD, Atorvastatin 40 mg PO QHS, Metformin 500 mg PO BID, "
                       "Aspirin 81 mg PO QD"]
    (tmp_path / "rows.json").write_text(json.dumps(
        [conversation_row(str(i), "page.png", answer) for i, answer in enumerate(answers)]))
    dataset = ConversationDataset(tmp_path / "rows.json")
    collator = VisionChatCollator(processor, 512, image_row)

    class Grads:
        from transformers import TrainerCallback

        class Capture(TrainerCallback):
            def __init__(self):
                self.grads = None

            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def step_gradient(batch_size, accumulation):
        settings.train.per_device_batch_size, settings.train.grad_accum_steps = batch_size, accumulation
        args = training_arguments(settings, tmp_path / f"out{batch_size}", has_eval=False)
        args.max_grad_norm = 0.0  # no clipping: compare raw gradients
        capture = Grads.Capture()
        trainer = make_trainer(StepTimer(), model=adapter_with_random_b(tiny_model_dir, settings), args=args,
                               train_dataset=dataset, data_collator=collator, callbacks=[capture])
        trainer.train()
        return capture.grads

    whole = step_gradient(2, 1)
    accumulated = step_gradient(1, 2)
    assert whole.keys() == accumulated.keys() and whole
    for name, grad in whole.items():
        assert torch.allclose(grad, accumulated[name], rtol=1e-4, atol=1e-5), name

    # The test can fail: a mean of the two micro-batch means gives a different gradient.
    model = adapter_with_random_b(tiny_model_dir, settings)
    for row in dataset.rows:
        batch = collator([row])
        labels = batch.pop("labels")
        (answer_only_loss(model, batch, labels)[0] / 2).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert max(float((whole[n] - naive[n]).abs().max()) for n in whole) > 1e-2


def test_an_all_masked_micro_batch_gives_a_finite_zero_loss(tiny_model_dir, tiny_settings, processor, image_row):
    model = adapter_with_random_b(tiny_model_dir, tiny_settings)
    batch = VisionChatCollator(processor, 512, image_row)([conversation_row("x", "page.png", "Aspirin 81 mg")])
    labels = torch.full_like(batch.pop("labels"), IGNORE_INDEX)
    for num_items in (None, 0, torch.tensor(7)):
        loss, _ = answer_only_loss(model, batch, labels, num_items)
        assert torch.isfinite(loss) and float(loss) == 0.0
        loss.backward()  # still part of the graph (DDP expects every LoRA weight to get a gradient)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_a_mismatched_or_untrained_adapter_fails_the_merge(tiny_model_dir, tiny_settings, processor, tmp_path):
    from safetensors.torch import load_file, save_file

    from medvl.evaluation.evaluate import MergeError, merge_adapter

    untrained = tmp_path / "untrained"
    load_for_training(tiny_model_dir, tiny_settings).save_pretrained(untrained)  # lora_B still zero
    with pytest.raises(MergeError, match="changed none of the"):
        merge_adapter(tiny_model_dir, untrained, tmp_path / "merged")

    mismatched = tmp_path / "mismatched"
    adapter_with_random_b(tiny_model_dir, tiny_settings).save_pretrained(mismatched)
    weights = load_file(mismatched / "adapter_model.safetensors")
    moved = {key.replace("layers.0.", "layers.99."): value for key, value in weights.items()}  # another model's layer
    save_file(moved, mismatched / "adapter_model.safetensors")
    with pytest.raises(MergeError, match="does not fit base"):
        merge_adapter(tiny_model_dir, mismatched, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    good = tmp_path / "good"
    adapter_with_random_b(tiny_model_dir, tiny_settings).save_pretrained(good)
    processor.save_pretrained(good)  # phase 6 saves it beside the adapter
    result = merge_adapter(tiny_model_dir, good, tmp_path / "merged")
    assert result["changed_weights"] == result["targeted_weights"] > 0


def test_checkpoints_resume_only_on_the_same_settings_and_data(tmp_path):
    """The resume fingerprint covers the split files: after phase 5 reruns on other rows, the
    checkpoints of the old rows are discarded instead of silently resumed."""
    from medvl.training.trainer import prepare_checkpoint_dir, resume_fingerprint

    data = tmp_path / "formatted"
    data.mkdir()
    (data / "train.json").write_text('[{"id": "a"}]')
    (data / "val.json").write_text("[]")
    checkpoints = tmp_path / "checkpoints"
    first = resume_fingerprint("settings1", data)
    prepare_checkpoint_dir(checkpoints, first)
    (checkpoints / "checkpoint-10").mkdir()
    for name in ("trainer_state.json", "adapter_model.safetensors"):  # what a complete checkpoint has
        (checkpoints / "checkpoint-10" / name).write_text("{}")
    resumed = prepare_checkpoint_dir(checkpoints, resume_fingerprint("settings1", data))
    assert resumed == checkpoints / "checkpoint-10"  # same settings and data: resumed
    (data / "train.json").write_text('[{"id": "b"}]')
    assert resume_fingerprint("settings1", data) != first
    prepare_checkpoint_dir(checkpoints, resume_fingerprint("settings1", data))
    assert not (checkpoints / "checkpoint-10").exists()  # other rows: discarded


def test_a_packed_batch_gives_each_sample_its_own_logits_loss_and_gradients(tiny_model_dir, tiny_settings, processor,
                                                                              tmp_path):
    """train.pack_samples: three samples of different pages, prompts and answers end to end in one
    row give each sample the logits it gets alone (so no sample sees another), and the summed
    answer loss and LoRA gradients of the three alone (float32 on the CPU: logits within 1e-4,
    loss and each gradient within 1e-4 of its size)."""
    from medvl.training.trainer import mrope_positions

    for name, size in (("a.png", (112, 56)), ("b.png", (56, 112)), ("c.png", (168, 112))):
        Image.new("RGB", size, "white").save(tmp_path / name)
    rows = [conversation_row("a", "a.png", "Aspirin 81 mg daily"),
            conversation_row("b", "b.png", "None", prompt="List every medication on this page."),
            conversation_row("c", "c.png", '{"diagnoses": ["CKD 3b", "HTN"]}', prompt="Extract.")]
    torch.manual_seed(0)
    model = load_for_training(tiny_model_dir, tiny_settings).eval()  # no LoRA dropout: comparable runs
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    alone = VisionChatCollator(processor, 512, tmp_path)
    packed = VisionChatCollator(processor, 512, tmp_path, pack=True)(rows)
    singles = [alone([row]) for row in rows]
    assert packed["input_ids"].shape == (1, sum(s["input_ids"].shape[1] for s in singles))  # no padding
    assert "attention_mask" not in packed and packed["position_ids"].shape[:2] == (4, 1)

    def loss_and_grads(batch):
        model.zero_grad()
        batch = dict(batch)
        labels = batch.pop("labels")
        batch.pop("attention_mask", None)
        logits = model(**batch, use_cache=False).logits
        targets = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        return logits.detach()[0], loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.requires_grad}

    packed_logits, packed_loss, packed_grads = loss_and_grads(packed)
    start, total, grads = 0, 0.0, {}
    for single in singles:
        logits, loss, single_grads = loss_and_grads(single)
        length = logits.shape[0]
        assert torch.allclose(packed_logits[start:start + length], logits, rtol=1e-4, atol=1e-4), (
            (packed_logits[start:start + length] - logits).abs().max())
        # its positions are its own: the packed row's M-RoPE rows restart with each sample
        assert torch.equal(packed["position_ids"][1:, 0, start:start + length], mrope_positions(
            single["input_ids"][0], single["mm_token_type_ids"][0], single["image_grid_thw"],
            processor.image_processor.merge_size))
        total += float(loss)
        grads = {n: grads.get(n, 0) + g for n, g in single_grads.items()}
        start += length
    assert abs(float(packed_loss) - total) <= 1e-4 * total
    for name, grad in grads.items():  # float32 sums in another order: relative to the gradient's norm
        assert float((packed_grads[name] - grad).norm() / grad.norm()) < 1e-4, name
    # and the answer-only loss the trainer uses reads a packed batch as it reads a padded one
    batch = dict(packed)
    labels = batch.pop("labels")
    assert torch.allclose(answer_only_loss(model, batch, labels)[0] * (labels[:, 1:] != IGNORE_INDEX).sum(),
                          packed_loss, rtol=1e-4)
