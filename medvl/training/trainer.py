"""Phase 6: QLoRA fine-tuning of Qwen2.5-VL, done the way that does not silently go wrong.

The five classic mistakes and where this module prevents each:

1. Loss on prompts and image tokens -> :class:`VisionChatCollator` masks every label except
   the assistant's answer and its closing ``<|im_end|>`` (worked example in its docstring).
2. LoRA on the vision tower, because ``q/k/v/o/gate/up/down_proj`` also name vision modules
   -> :data:`LORA_TARGET_REGEX` matches language-model projections only (and, with
   ``train.lora_output_head``, its output head, never the vision tower's), and
   :func:`freeze_vision` freezes every ``visual`` parameter; :func:`check_trainable` asserts both.
3. Truncated samples (a cut through image tokens breaks the model; a cut answer never trains
   its closing ``<|im_end|>``, so the model learns not to stop) -> phase 5 counts every
   sample's tokens with :func:`token_count` and drops those over ``train.max_length``; the
   collator refuses any that still would be cut, with :class:`TruncationError`.
4. A pixel budget that differs between training and serving -> the processor carries the
   profile's min/max pixels and is saved next to the adapter, which the server loads.
5. A loss averaged per micro-batch (Qwen2.5-VL declines ``num_items_in_batch``, so the
   Trainer would average micro-batch means: with answers of 30 to 370 tokens, a token in a
   short-answer micro-batch weighs several times more) -> :func:`answer_only_loss` divides
   the summed loss by the answer tokens of the whole optimizer step; tested against one
   batch holding both micro-batches.

We use the transformers ``Trainer`` with this collator rather than TRL's ``SFTTrainer``:
SFTTrainer's ``assistant_only_loss`` relies on ``{% generation %}`` markers in the chat
template, which Qwen2.5-VL's template does not have, and its completion-only masking is
text-only. The collator gives the same assistant-only loss explicitly, and is tested.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medvl.core.io import atomic_dir
from medvl.core.settings import Settings

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Projections of the language model only: a name containing "visual" never matches.
LORA_TARGET_REGEX = r"^(?!.*visual).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
# ... and, with train.lora_output_head, the language model's output head (top-level ``lm_head``).
LORA_HEAD_TARGET = "lm_head"


def lora_targets(settings: Settings) -> str:
    """The regex PEFT matches module names against (it full-matches each name)."""
    return LORA_TARGET_REGEX + (f"|^{LORA_HEAD_TARGET}$" if settings.train.lora_output_head else "")


class TruncationError(ValueError):
    """A sample longer than max_length reached the collator (phase 5 drops those)."""


# --------------------------------------------------------------------------- the collator


@dataclass
class VisionChatCollator:
    """Chat template + processor + padding + assistant-only labels, one batch at a time.

    Worked example (token strings shown for readability; ``[I]`` is one ``<|image_pad|>``,
    and the image here is 2x2 visual tokens)::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      label -100 (system)
        <|im_start|>user\\n<|vision_start|>[I][I][I][I]<|vision_end|>       label -100 (user, image)
        List the medications.<|im_end|>\\n                                  label -100 (user)
        <|im_start|>assistant\\n                                            label -100 (header)
        {"medications": [...]}<|im_end|>                                   label = input id (trained)
        \\n                                                                 label -100
        <|endoftext|> <|endoftext|> ...                                     label -100 (padding)

    So ``labels[i] == input_ids[i]`` exactly on the answer tokens and the ``<|im_end|>`` that
    closes them, and -100 everywhere else; a conversation with several assistant turns
    trains on each answer. Nothing is ever cut: a sample longer than ``max_length`` raises
    :class:`TruncationError` (phase 5 has dropped those, counted, with :func:`token_count`,
    which gives the length this encoding produces without processing the image).
    """

    processor: Any
    max_length: int
    image_root: Path
    # Batch widths are rounded up to a multiple of this (train.pad_to_multiple_of), so that
    # fewer distinct shapes reach the GPU kernels.
    pad_to_multiple_of: int = 1
    # train.pack_samples: the batch's samples end to end in one row (:meth:`pack`), no padding.
    pack: bool = False

    def __post_init__(self) -> None:
        tok = self.processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        self.header = answer_header(tok)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(row) for row in rows]
        return self.packed(encoded) if self.pack else self.pad(encoded)

    def encode(self, row: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One conversation -> input_ids, attention_mask, labels, pixel_values, image_grid_thw."""
        with Image.open(self.image_root / row["image"]) as img:
            image = img.convert("RGB")
        text = self.processor.apply_chat_template(row["messages"], tokenize=False)
        enc = self.processor(text=[text], images=[image], return_tensors="pt")
        ids = enc["input_ids"][0]
        if ids.numel() > self.max_length:
            raise TruncationError(
                f"sample {row.get('id')}: {ids.numel()} tokens > train.max_length={self.max_length}; "
                "phase 5 drops samples that do not fit: rerun it with the current settings.")
        out = {"input_ids": ids, "attention_mask": enc["attention_mask"][0],
               "labels": assistant_labels(ids, self.header, self.im_end),
               "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        if "mm_token_type_ids" in enc:
            out["mm_token_type_ids"] = enc["mm_token_type_ids"][0]
        return out

    def pad(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad the sequences (training needs no left padding) and stack the images."""
        longest = max(e["input_ids"].numel() for e in encoded)
        width = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
        batch: dict[str, torch.Tensor] = {}
        for key, value in fill.items():
            if key not in encoded[0]:
                continue
            rows = [torch.cat([e[key], torch.full((width - e[key].numel(),), value, dtype=e[key].dtype)])
                    for e in encoded]
            batch[key] = torch.stack(rows)
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in encoded])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encoded])
        return batch

    def packed(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The samples end to end in one row of exactly their tokens, each attending only to itself.

        Qwen2.5-VL's positions are M-RoPE: three rows (time, height, width) that run through an
        image's grid and resume after it. Computed on the packed row, a later sample's positions
        would continue from the earlier one's; so each sample gets its own
        (:func:`mrope_positions`, transformers' ``get_rope_index`` on that sample alone) and a
        fourth row in front, 0, 1, 2, ... restarting at each sample. Given ``position_ids`` of
        shape ``[4, 1, length]`` and no attention mask, transformers takes that first row as the
        text positions and, where it restarts, starts a new sequence: attention is block-causal,
        a sample never sees another. Worked example, two samples of 5 and 3 tokens (``[I]`` an
        image token of a 1x2 grid of merged patches)::

            tokens   <s> u  [I] [I]  a  | <s>  u   a
            row 0     0  1   2   3   4  |  0   1   2      text positions: restart = new sample
            rows 1-3  0  1   2   2   4  |  0   1   2      time (height, width: 2 3 / 2 3 for [I])
            labels   -100 ... answer    | -100 ... answer

        The first token of every sample is ``<|im_start|>`` (label -100), so no sample is trained
        to predict the next one's start. ``tests/test_training.py`` checks that every sample's
        logits, loss and LoRA gradients are those it gets alone."""
        batch = {"input_ids": torch.cat([e["input_ids"] for e in encoded])[None],
                 "labels": torch.cat([e["labels"] for e in encoded])[None],
                 "mm_token_type_ids": torch.cat([self._token_types(e) for e in encoded])[None]}
        text = torch.cat([torch.arange(e["input_ids"].numel()) for e in encoded])
        mrope = torch.cat([mrope_positions(e["input_ids"], self._token_types(e), e["image_grid_thw"],
                                           self.processor.image_processor.merge_size) for e in encoded], dim=1)
        batch["position_ids"] = torch.cat([text[None], mrope])[:, None, :]
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in encoded])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in encoded])
        return batch

    def _token_types(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """0 for text, 1 for image tokens (the processor's ``mm_token_type_ids`` when it gives them)."""
        if "mm_token_type_ids" in encoded:
            return encoded["mm_token_type_ids"]
        return (encoded["input_ids"] == self.image_pad).to(torch.int32)


def mrope_positions(input_ids: torch.Tensor, token_types: torch.Tensor, image_grid_thw: torch.Tensor,
                    merge_size: int) -> torch.Tensor:
    """One sample's M-RoPE positions, ``[3, length]``, by transformers' own ``get_rope_index``
    (so they cannot drift from the model's), run without the model: it reads only the vision
    config's merge size (and tokens per second, for videos, which training has none of)."""
    from types import SimpleNamespace

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    holder = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        spatial_merge_size=merge_size, tokens_per_second=1)))
    holder.get_vision_position_ids = lambda *a, **k: Qwen2_5_VLModel.get_vision_position_ids(holder, *a, **k)
    positions, _ = Qwen2_5_VLModel.get_rope_index(holder, input_ids[None], mm_token_type_ids=token_types[None],
                                                  image_grid_thw=image_grid_thw)
    return positions[:, 0]


def answer_header(tokenizer: Any) -> list[int]:
    """The tokens that open an assistant turn; what follows them up to <|im_end|> is trained."""
    return tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def token_count(processor: Any, messages: list[dict[str, Any]], image_size: tuple[int, int]) -> tuple[int, int]:
    """(tokens, trained tokens) of one single-image conversation as the collator encodes it.

    Computed from the image's size with the processor's own arithmetic (resize to the pixel
    budget, 14x14 patches merged 2x2 into one visual token) instead of processing the pixels,
    so phase 5 can measure thousands of samples in seconds; a test checks it against the
    collator token for token.
    """
    tok = processor.tokenizer
    text = processor.apply_chat_template(messages, tokenize=False)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    width, height = image_size
    image_processor = processor.image_processor
    visual = image_processor.get_number_of_image_patches(height, width, {}) // image_processor.merge_size ** 2
    trained = int((assistant_labels(ids, answer_header(tok), tok.convert_tokens_to_ids("<|im_end|>"))
                   != IGNORE_INDEX).sum())
    return ids.numel() - 1 + visual, trained


def assistant_labels(ids: torch.Tensor, header: list[int], im_end: int) -> torch.Tensor:
    """-100 everywhere except each assistant answer and its closing ``<|im_end|>``."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    seq = ids.tolist()
    n = len(header)
    i = 0
    while i <= len(seq) - n:
        if seq[i:i + n] == header:
            start = i + n
            end = start
            while end < len(seq) and seq[end] != im_end:
                end += 1
            stop = min(end + 1, len(seq))  # include <|im_end|> when present
            labels[start:stop] = ids[start:stop]
            i = stop
        else:
            i += 1
    return labels


# --------------------------------------------------------------------------- the model


def freeze_vision(model: Any) -> int:
    """Freeze every parameter of the vision tower; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if "visual" in name:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def lora_config(settings: Settings) -> Any:
    from peft import LoraConfig

    t = settings.train
    return LoraConfig(r=t.lora_r, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, bias="none",
                      task_type="CAUSAL_LM", target_modules=lora_targets(settings))


def check_trainable(model: Any) -> dict[str, Any]:
    """Assert the LoRA placement and report the parameter counts (raises on a violation)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    bad = [n for n, _ in trainable if "visual" in n or "lora_" not in n]
    if bad:
        raise RuntimeError(f"unexpected trainable parameters (vision or non-LoRA): {bad[:5]}")
    lora_in_vision = [n for n, _ in model.named_modules() if "visual" in n and "lora_" in n]
    if lora_in_vision:
        raise RuntimeError(f"LoRA modules inside the vision tower: {lora_in_vision[:5]}")
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    # 4-bit weights are packed two per byte: count the parameters they stand for.
    n_total += sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    lora_modules = sorted({re.sub(r"\.lora_[AB].*", "", n) for n, _ in trainable})
    return {"trainable_params": n_trainable, "total_params": n_total,
            "trainable_pct": 100.0 * n_trainable / n_total, "lora_modules": len(lora_modules)}


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment (1 process: 0, 0, 1)."""
    import os

    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    return world()[0] == 0


def rank_device_map() -> Any:
    """Under data parallelism each rank holds a whole model on its own device."""
    rank, local_rank, size = world()
    if size == 1:
        return None
    return {"": local_rank} if torch.cuda.is_available() else {"": "cpu"}


def load_for_training(model_dir: Path, settings: Settings) -> Any:
    """NF4 base (bf16 compute), frozen in its own precision, LoRA on the language model only.

    This is deliberately not ``peft.prepare_model_for_kbit_training``: that casts every
    non-quantized weight (vision tower, embeddings, lm_head, norms: 2.3 B parameters) to
    float32, which doubles their memory and runs them as float32 matmuls, to guard float16
    training against overflow. Training here runs in bf16 (RMSNorm already computes in
    float32 inside), so the frozen weights stay bf16 and the LoRA weights float32.
    Gradient checkpointing covers the language model's layers only: the frozen vision
    tower keeps no activations for backward in the first place.
    """
    from peft import get_peft_model

    from medvl.model.loading import load_model

    t = settings.train
    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(model_dir, settings, "nf4" if t.quantize_4bit else "none", dtype=dtype,
                       device_map=rank_device_map())
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    model.requires_grad_(False)
    if t.gradient_checkpointing:
        model.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(settings))
    freeze_vision(model)  # belt and braces: PEFT must not have unfrozen anything visual
    return model


# --------------------------------------------------------------------------- the loss


def answer_only_loss(model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                     num_items: torch.Tensor | int | None = None) -> tuple[torch.Tensor, Any]:
    """Cross-entropy summed over the trained (answer) tokens, divided by ``num_items``.

    ``num_items`` is the number of trained tokens of the whole optimizer step (every
    accumulation micro-batch, every rank), as the Trainer counts it, so each answer token
    weighs the same whatever micro-batch it fell in; without it (evaluation), this batch's
    own count. A batch without a trained token gives 0, not NaN.

    The usual causal-LM loss projects every position through the 152 k-way lm_head and
    upcasts those logits to float32 (1024 positions: 0.6 GB per copy) although the collator
    masks all but the answer. Here ``logits_to_keep`` selects the positions whose next token
    is trained in any row of the batch, so lm_head and the softmax run on those alone; the
    sum is exactly the usual one (``tests/test_training.py`` checks it).
    """
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    total = torch.nn.functional.cross_entropy(outputs.logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                              ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets != IGNORE_INDEX).sum() if num_items is None else num_items
    return total / torch.as_tensor(count, device=total.device).clamp(min=1), outputs


class StepTimer:
    """Per optimizer step: wall time, tokens, and the evaluation and saving kept apart.

    The Trainer's own ``train_runtime`` and tokens/s include warm-up, every evaluation pass
    and every checkpoint save (on an H100, ``7b-random`` batch 2, 16 steps: 3.07 s/step and
    546 tokens/s from the whole run, while steady steps took ~1.0-1.3 s). A step here runs
    from the end of the previous one to its own end, so it includes waiting for data, minus
    any evaluation or saving in between; the first :attr:`WARMUP_STEPS` of a run are
    reported as warm-up (on an H100, ``7b-random`` batch 2, steps 1-5 ran at 340-1,130
    tokens/s while the allocator and kernels met new sequence lengths, later ones at
    ~1,400-1,800). CUDA is synchronised at step ends so the times are the GPU's.
    """

    WARMUP_STEPS = 5

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.evaluation_s: list[float] = []
        self.save_s: list[float] = []
        self._last_end = self._begin = 0.0
        self._excluded = 0.0
        self._tokens = 0

    def start(self, tokens_seen: int) -> None:
        self._last_end, self._tokens, self._excluded = self._now(), tokens_seen, 0.0

    def exclude(self, seconds: float, kind: str) -> None:
        """Time spent evaluating or saving between two steps (not part of either)."""
        self._excluded += seconds
        (self.evaluation_s if kind == "evaluation" else self.save_s).append(seconds)

    def step_begin(self) -> None:
        """The batches of the step are in hand: the time since the last step was data loading."""
        self._begin = self._now()

    def step_end(self, step: int, tokens_seen: int) -> None:
        now = self._now()
        self.steps.append({"step": step, "seconds": now - self._last_end - self._excluded,
                           "data_wait_s": max(0.0, self._begin - self._last_end - self._excluded),
                           "tokens": tokens_seen - self._tokens})
        self._last_end, self._tokens, self._excluded = now, tokens_seen, 0.0

    def recent_tokens_per_s(self, steps: int) -> float | None:
        """Tokens/s over the last ``steps`` steps (logged beside the loss)."""
        recent = self.steps[-steps:]
        seconds = sum(s["seconds"] for s in recent)
        return sum(s["tokens"] for s in recent) / seconds if recent and seconds > 0 else None

    def summary(self, whole_run_s: float) -> dict[str, Any]:
        warm, steady = self.steps[:self.WARMUP_STEPS], self.steps[self.WARMUP_STEPS:]
        steady_s = sum(s["seconds"] for s in steady)
        tokens = sum(s["tokens"] for s in steady)
        return {
            "steady_state": {
                "steps": len(steady),
                "seconds_per_step": steady_s / len(steady) if steady else None,
                "tokens_per_s": tokens / steady_s if steady and steady_s > 0 else None,
                "tokens_per_step": tokens / len(steady) if steady else None,
                "note": f"optimizer steps after the first {self.WARMUP_STEPS}, data loading included, "
                        "evaluation and checkpoint saving excluded",
            },
            "warmup": {"steps": len(warm), "seconds": sum(s["seconds"] for s in warm)},
            "step_times": [{"step": s["step"], "seconds": round(s["seconds"], 4),
                            "data_wait_s": round(s["data_wait_s"], 4), "tokens": s["tokens"]} for s in self.steps],
            "evaluation": {"passes": len(self.evaluation_s), "seconds": sum(self.evaluation_s)},
            "checkpoint_saving": {"saves": len(self.save_s), "seconds": sum(self.save_s)},
            "whole_run": {"seconds": whole_run_s, "steps": len(self.steps),
                          "seconds_per_step": whole_run_s / len(self.steps) if self.steps else None,
                          "tokens_per_s": sum(s["tokens"] for s in self.steps) / whole_run_s if whole_run_s > 0 else None},
        }

    @staticmethod
    def _now() -> float:
        import time

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()


def make_trainer(timer: StepTimer, **kwargs: Any) -> Any:
    """A transformers Trainer with :func:`answer_only_loss` (token mean over the optimizer
    step) that times its steps, evaluations and saves with ``timer``."""
    import time

    from transformers import Trainer, TrainerCallback

    class TimerCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            timer.start(state.num_input_tokens_seen)

        def on_step_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            timer.step_begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            timer.step_end(state.global_step, state.num_input_tokens_seen)

    class AnswerOnlyTrainer(Trainer):
        def __init__(self, **trainer_kwargs: Any) -> None:
            super().__init__(**trainer_kwargs)
            # Qwen2.5-VL says it does not take num_items_in_batch (accepts_loss_kwargs=False),
            # so the Trainer would average per-micro-batch means; this loss does take it.
            self.model_accepts_loss_kwargs = True
            self.add_callback(TimerCallback())

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            loss, outputs = answer_only_loss(model, inputs, labels, num_items_in_batch)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items counts every rank's tokens; DDP then averages the ranks' gradients.
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def evaluate(self, *args: Any, **eval_kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return super().evaluate(*args, **eval_kwargs)
            finally:
                timer.exclude(time.perf_counter() - started, "evaluation")

        def _save_checkpoint(self, *args: Any, **save_kwargs: Any) -> None:
            started = time.perf_counter()
            try:
                super()._save_checkpoint(*args, **save_kwargs)
            finally:
                timer.exclude(time.perf_counter() - started, "save")

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:  # a training log: add the speed of the steps since the last one
                rate = timer.recent_tokens_per_s(self.args.logging_steps)
                if rate is not None:
                    logs["step_tokens_per_s"] = rate
            super().log(logs, start_time)

    return AnswerOnlyTrainer(**kwargs)


# --------------------------------------------------------------------------- data


class ConversationDataset(torch.utils.data.Dataset):
    """Rows of datasets/formatted/<split>.json; images are read lazily by the collator."""

    def __init__(self, path: Path) -> None:
        self.rows = json.loads(path.read_text())

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


# --------------------------------------------------------------------------- checkpoints


def last_complete_checkpoint(folder: Path, remove_incomplete: bool = True) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json exists (written last by the Trainer).

    A run killed while saving leaves a checkpoint without it; that one is removed (by the
    main process only) so the resume starts from the previous, complete checkpoint.
    """
    import shutil

    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                        key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for checkpoint in candidates:
        if (checkpoint / "trainer_state.json").is_file() and any(checkpoint.glob("adapter_model.*")):
            return checkpoint
        if remove_incomplete:
            log.warning("removing incomplete checkpoint %s (the run was killed while saving it)", checkpoint.name)
            shutil.rmtree(checkpoint, ignore_errors=True)
    return None


def resume_fingerprint(settings_fingerprint: str, data_dir: Path) -> str:
    """What a checkpoint must match to be resumed: the settings and the training data (a hash
    of the split files). Settings alone were not enough: after phase 5 reran on other rows,
    phase 6 silently resumed a checkpoint trained on the old ones."""
    import hashlib

    digest = hashlib.sha256()
    for name in ("train.json", "val.json"):
        digest.update((data_dir / name).read_bytes())
    return f"{settings_fingerprint}-data-{digest.hexdigest()[:16]}"


def prepare_checkpoint_dir(folder: Path, fingerprint: str) -> Path | None:
    """Keep checkpoints only if they were made with the same settings and data (the
    :func:`resume_fingerprint`); return the resume point."""
    import shutil

    marker = folder / "settings_hash.txt"
    if folder.is_dir() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        log.info("discarding checkpoints made with other settings or data in %s", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    return last_complete_checkpoint(folder)


# --------------------------------------------------------------------------- the run


def training_arguments(settings: Settings, output_dir: Path, has_eval: bool) -> Any:
    from transformers import TrainingArguments

    from medvl.core.settings import report_destinations

    t = settings.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=t.weight_decay,
        lr_scheduler_type="cosine",
        optim=t.optimizer if t.optimizer != "auto" else "paged_adamw_8bit" if cuda else "adamw_torch",
        bf16=bf16,
        # Checkpointing is set up on the language model by load_for_training, not by the Trainer
        # (which would also wrap the frozen vision tower).
        gradient_checkpointing=False,
        prediction_loss_only=True,  # eval logits cover the answer positions only
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,  # every LoRA parameter is used in every step
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and world()[2] > 1 else None,  # CPU data parallelism
        remove_unused_columns=False,  # the collator needs the raw rows
        dataloader_num_workers=t.dataloader_workers,
        # TensorBoard is attached by run_training (its writer goes to logs/tensorboard/).
        report_to=[d for d in report_destinations(t.report_to) if d != "tensorboard"] or "none",
        seed=t.seed,
        disable_tqdm=False,
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_setup(settings: Settings) -> None:
    """Problems the Trainer would only find after the model has loaded, raised at once: an
    unknown optimizer, or a curve destination whose package is missing."""
    import importlib.util

    from transformers.training_args import OptimizerNames

    from medvl.core.settings import report_destinations

    t = settings.train
    known = sorted(o.value for o in OptimizerNames)
    if t.optimizer != "auto" and t.optimizer not in known:
        raise TrainingSetupError(f"train.optimizer={t.optimizer!r} is not a Trainer optimizer; 'auto' or one of "
                                 f"{', '.join(known)}")
    wanted = report_destinations(t.report_to)
    missing = [name for name in ("tensorboard", "wandb") if name in wanted and importlib.util.find_spec(name) is None]
    if missing:
        raise TrainingSetupError(f"train.report_to={t.report_to!r} needs {' and '.join(missing)}: "
                                 f"pip install {' '.join(missing)}, or --set train.report_to=none")


def curve_callbacks(settings: Settings, tensorboard_dir: Path) -> list[Any]:
    """The TensorBoard writer, logging to ``tensorboard_dir``, when train.report_to names it
    (W&B goes through the Trainer's own report_to)."""
    from medvl.core.settings import report_destinations

    if "tensorboard" not in report_destinations(settings.train.report_to):
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(tensorboard_dir)
    return [callback]


class TrainingSetupError(RuntimeError):
    """Training cannot start as configured (one line for the user)."""


def run_training(settings: Settings, base_dir: Path, data_dir: Path, adapter_dir: Path,
                 checkpoint_dir: Path, fingerprint: str, tensorboard_dir: Path) -> dict[str, Any] | None:
    """Train (resuming when a complete checkpoint exists) and save adapter + processor.

    Under ``accelerate launch`` with N processes this trains data-parallel (DDP): each rank
    holds the NF4 model on its own device, and only the main process saves and returns
    metrics (the others return None).
    """
    import time

    from transformers import TrainerState

    from medvl.model.loading import load_processor
    from medvl.model.memory import peak_memory_mb

    check_setup(settings)
    callbacks = curve_callbacks(settings, tensorboard_dir)
    processor = load_processor(base_dir, settings, padding_side="right")
    train_set = ConversationDataset(data_dir / "train.json")
    val_set = ConversationDataset(data_dir / "val.json")
    collator = VisionChatCollator(processor, settings.train.max_length, data_dir, settings.train.pad_to_multiple_of,
                                  pack=settings.train.pack_samples)

    model = load_for_training(base_dir, settings)
    counts = check_trainable(model)
    log.info("trainable parameters: %s of %s (%.2f%%) in %d LoRA-wrapped modules",
             f"{counts['trainable_params']:,}", f"{counts['total_params']:,}", counts["trainable_pct"],
             counts["lora_modules"])

    # Creating the arguments sets up the process group under a launcher (gloo on a CPU).
    args = training_arguments(settings, checkpoint_dir, has_eval=len(val_set) > 0)
    # The main process cleans stale/incomplete checkpoints; every rank then resumes from the same one.
    if is_main_process():
        prepare_checkpoint_dir(checkpoint_dir, resume_fingerprint(fingerprint, data_dir))
    _barrier()
    resume = last_complete_checkpoint(checkpoint_dir, remove_incomplete=False)
    resumed_step = int(resume.name.split("-")[-1]) if resume else 0
    if resume:
        log.info("resuming from %s (step %d)", resume.name, resumed_step)
    timer = StepTimer()
    trainer = make_trainer(timer, model=model, args=args, train_dataset=train_set, callbacks=callbacks,
                           eval_dataset=val_set if len(val_set) else None, data_collator=collator)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    state = json.loads((resume / "trainer_state.json").read_text()) if resume else {}
    tokens_before = int(state.get("num_input_tokens_seen", 0))
    started = time.perf_counter()
    if resume and state.get("global_step", 0) >= state.get("max_steps", float("inf")):
        # The run had finished (a forced rerun with the same settings): the Trainer would
        # train one step past max_steps (transformers 5.17), so take its result as it is.
        log.info("%s finished the run (step %d of %d): keeping its adapter, no further training",
                 resume.name, state["global_step"], state["max_steps"])
        model.load_adapter(str(resume), adapter_name="default", is_trainable=True)
        trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        runtime = None
    else:
        runtime = trainer.train(resume_from_checkpoint=str(resume) if resume else None).metrics.get("train_runtime")
    train_s = time.perf_counter() - started
    if not trainer.is_world_process_zero():
        return None  # only the main process saves and reports

    with atomic_dir(adapter_dir) as staging:
        trainer.model.save_pretrained(staging)
        processor.save_pretrained(staging)  # carries min/max pixels: serving uses the same budget
        (staging / "medvl_adapter.json").write_text(json.dumps({
            "base_model": str(base_dir), "min_pixels": settings.model.min_pixels,
            "max_pixels": settings.model.max_pixels, "settings_hash": fingerprint,
            "lora_target_regex": lora_targets(settings)}, indent=2))

    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    eval_losses = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    timing = timer.summary(train_s)
    return {
        **counts,
        "train_time_s": train_s,
        "train_runtime_s": runtime,
        "global_step": trainer.state.global_step,
        "resumed_from_step": resumed_step,
        "epochs": trainer.state.epoch,
        "steps_this_run": trainer.state.global_step - resumed_step,
        **timing,
        "initial_loss": losses[0][1] if losses else None,
        "final_loss": losses[-1][1] if losses else None,
        "loss": "token mean over each optimizer step (all micro-batches and ranks)",
        "loss_curve": [{"step": s, "loss": v} for s, v in losses],
        "eval_loss_curve": [{"step": s, "eval_loss": v} for s, v in eval_losses],
        "learning_rate": settings.train.learning_rate,
        "training_samples": len(train_set),
        "validation_samples": len(val_set),
        "tokens_seen_this_run": int(trainer.state.num_input_tokens_seen) - tokens_before,
        "peak_memory_mb": peak_memory_mb(),
        "processes": world()[2],
        "global_batch": settings.train.per_device_batch_size * settings.train.grad_accum_steps * world()[2],
        "curves": {"report_to": settings.train.report_to,
                   "tensorboard_dir": str(tensorboard_dir) if callbacks else None},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
