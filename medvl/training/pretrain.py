"""Phase 2 for a stand-in that must know something before phase 6: pre-train every weight on
reading a page's text back.

Why: a random base scores 0 on every page and so does anything fine-tuned from it in minutes,
so base versus fine-tuned, what 4 bits cost, calibration and served parity were all 0 against 0
(issue 43). The real Qwen2.5-VL arrives able to read but not knowing this project's record;
the `small` profile's base is made the same: phase 2 trains it to give a page's printed lines
back, all of them, those that hold a given word or its labelled lines (:func:`readback_task`),
on synthetic documents of their own seeds (:data:`PRETRAIN_SEED`: none is a page phase 5
splits, AWQ calibrates on, phase 3 benchmarks or the suite holds), answered in plain lines or
in JSON of keys of its own, never the record's keys or shape. Phase 6 then teaches the record
with the seed's method.

Why JSON answers too: the real base has written JSON before it meets this project; a base that
never had to (run 2, docs/results/h100/small/run2-lora/probes/token_loss_merged_val64.jsonl)
left every JSON punctuation token, and every word start right after a quote, at 2.5-2.9 nats
after fine-tuning (65% of phase 6's loss, which stopped at 2.0): their output-head rows had
only ever been pushed down.

With ``data.ocr_grounded_prompt`` (the `small` profile) the prompt carries the page's lines
before the instruction, in the form the OCR-grounded prompt gives them (one line per printed
line, no blank lines), read as PP-OCR reads this project's pages: it drops the spaces of some
lines, all of them or some ("Amoxicillin500mgPOBID", "3.Type 2 diabetes"; seen in phase 5's
OCR text). The answer is the page's own lines, spaced as printed: the base learns to give back
text from a noisy reading, as a reading model gives back text from pixels. The noise is
simulated (:func:`ocr_like`) because reading thousands of pre-training pages by OCR would cost
minutes of the GPU session; phases 5, 7 and the server ground with the real OCR. Without the
setting the prompt is the image and the instruction, and the base must learn to read pixels.

The loop is plain PyTorch (AdamW, warm-up then cosine decay, bf16 autocast on a GPU over
float32 weights) over the phase-6 collator, so the chat template, the pixel budget and the
answer-only labels are the ones fine-tuning and serving use. The model is loaded and its loss
taken as phase 6 does (:func:`medvl.model.loading.load_model`: the vision tower's windows in one
attention call per layer; :func:`medvl.training.trainer.answer_only_loss`: lm_head and the
softmax over answer positions only). Run 3 loaded it with transformers' defaults, which attend
window by window, and took 0.2 s a step at 16 pages (39 k tokens/s on an H200; phase 6, with
both, 0.14 s at 55 k).
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from medvl.core.io import atomic_write_bytes, atomic_write_json
from medvl.core.parallel import process_map
from medvl.core.settings import Settings
from medvl.medical.documents import PRETRAIN_SEED, generate_document, generated_png
from medvl.medical.prompts import ocr_grounded
from medvl.model.loading import load_model, load_processor
from medvl.training.trainer import IGNORE_INDEX, VisionChatCollator, answer_only_loss, token_count

log = logging.getLogger(__name__)

READBACK_PROMPT = "Read the text of this page back, line by line, spaced as printed."
LOOKUP_PROMPT = 'Read back the lines of this page that contain "{word}", spaced as printed.'
READBACK_JSON_PROMPT = ('Read the text of this page back as JSON, spaced as printed: '
                        '{"lines": [{"number": 1, "text": "..."}, ...]}.')
LOOKUP_JSON_PROMPT = ('Read back the lines of this page that contain "{word}" as JSON, spaced as printed: '
                      '{{"word": "...", "lines": ["...", ...]}}.')
LABELS_JSON_PROMPT = ('Read back the labelled lines of this page ("Label: text") as a JSON object '
                      'from each label to its text, spaced as printed.')
SECTION_JSON_PROMPT = ('Read back the lines under the heading "{heading}" as a JSON list, without their '
                       'numbers or dashes, spaced as printed.')
TABLE_JSON_PROMPT = ("Read back the lines of this page printed in columns as JSON, each line a list of its "
                     "cells, spaced as printed.")
# Page words a look-up asks for: three characters or more, starting with a letter.
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9/%.-]{2,}")
# A labelled line: a short label starting with a letter, a colon, then its text (maybe none).
_LABELLED = re.compile(r"^([A-Za-z][A-Za-z /()-]{0,30}):(?: (.*))?$")
# A heading: a line that is a short label and its colon alone ("Assessment:", "Discharge medications:").
_HEADING = re.compile(r"^[A-Za-z][A-Za-z /()-]{0,40}:$")
# A list line's marker: "1. ", "2) ", "- ".
_MARKER = re.compile(r"^(?:\d+[.)]|-)\s*")
# Cells of a line printed in columns: runs of two or more spaces part them.
_COLUMN_GAP = re.compile(r"\s{2,}")
PREFIX = "pre"
HELD_OUT = 32  # pages kept out of pre-training to measure it on


def page_lines(text: str) -> list[str]:
    """A page's printed lines as the OCR-grounded prompt gives them: blank lines dropped, runs
    of spaces closed up (OCR joins a row's boxes with one space)."""
    return [re.sub(r"\s+", " ", line).strip() for line in text.splitlines() if line.strip()]


def ocr_like(lines: list[str], rng: random.Random) -> list[str]:
    """``lines`` as PP-OCR tends to read them: half intact, a quarter with every space dropped,
    a quarter with each space dropped at random (a third of them)."""
    out = []
    for line in lines:
        roll = rng.random()
        if roll < 0.5:
            out.append(line)
        elif roll < 0.75:
            out.append(line.replace(" ", ""))
        else:
            out.append("".join(part + ("" if rng.random() < 1 / 3 else " ") for part in line.split(" ")).rstrip())
    return out


def sections(lines: list[str]) -> dict[str, list[str]]:
    """Each heading's lines (up to the next heading), their list markers dropped; headings with
    no line under them left out. Worked example::

        Assessment:                      {"Assessment:": ["Community-acquired pneumonia", "COPD"],
        1. Community-acquired pneumonia   "Plan / Medications:": ["Amoxicillin 875 mg PO TID"]}
        2.COPD
        Plan / Medications:
        - Amoxicillin 875 mg PO TID
    """
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if _HEADING.match(line):
            current = out.setdefault(line, [])
        elif current is not None:
            current.append(_MARKER.sub("", line, count=1))
    return {heading: items for heading, items in out.items() if items}


def columns(text: str) -> list[list[str]]:
    """The cells of each line of ``text`` (a page as printed, before OCR) printed in three or more
    columns, in order. Worked example (a lab table's header and a row without a flag)::

        Test                 Result  Unit      Ref range     Flag    ["Test", "Result", "Unit", "Ref range", "Flag"]
        Troponin I             0.06  ng/mL     0.00-0.04             ["Troponin I", "0.06", "ng/mL", "0.00-0.04"]

    The OCR-grounded prompt gives such a line with single spaces ("Troponin I 0.06 ng/mL
    0.00-0.04"), so giving its cells back means knowing where a cell ends: a table read into
    JSON, as a base that reads documents can, with no key of the record."""
    rows = [[cell for cell in _COLUMN_GAP.split(line.strip()) if cell] for line in text.splitlines()]
    return [row for row in rows if len(row) >= 3]


def _dumps(value: Any) -> str:
    """JSON as the record's answers are written (``json.dumps``' spacing, text as is)."""
    return json.dumps(value, ensure_ascii=False)


def readback_task(lines: list[str], rng: random.Random, table: list[list[str]] | None = None) -> tuple[str, str]:
    """(instruction, answer) for a page. Half the pages answer in plain lines: every line back
    (copying in order) or the lines that hold a word drawn from the page (finding text by its
    content, then copying it: what extraction asks of a reader). The rest answer in JSON: the
    same two in keys of its own (none is a record key: tests/test_pretrain.py), each labelled
    line's label to its text, the lines under a heading without their list markers, or the
    cells of the lines printed in columns (``table``, from :func:`columns`), so the base has
    written brackets, quotes, empty strings and a word start right after a quote, has picked a
    section's items from the page in order and has split a table's rows into cells, before phase
    6 asks for the record.

    Why the section task: run 3 (docs/results/h200/README.md) wrote the record's JSON at a loss
    of 0.05 but got most diagnoses and lab values wrong, each a well-formed item the page does
    not hold: choosing the next item from the page, not the JSON, was what failed."""
    if table and len(table) >= 4 and rng.random() < 0.35:  # a table (a lab report's): its rows' cells
        return TABLE_JSON_PROMPT, _dumps(table)
    roll = rng.random()
    words = sorted({w for line in lines for w in _WORD.findall(line)})
    if roll < 0.15:
        return READBACK_PROMPT, "\n".join(lines)
    if roll < 0.3:
        word = rng.choice(words)
        return LOOKUP_PROMPT.format(word=word), "\n".join(line for line in lines if word in line)
    headed = sections(lines)
    if roll < 0.5 and headed:
        heading = rng.choice(sorted(headed))
        return SECTION_JSON_PROMPT.format(heading=heading), _dumps(headed[heading])
    if roll < 0.62 and len(table or []) >= 2:
        return TABLE_JSON_PROMPT, _dumps(table)
    labelled = [m for m in map(_LABELLED.match, lines) if m]
    if roll < 0.72 and labelled:
        pairs: dict[str, str] = {}
        for match in labelled:
            pairs.setdefault(match.group(1), match.group(2) or "")
        return LABELS_JSON_PROMPT, _dumps(pairs)
    if roll < 0.86:
        word = rng.choice(words)
        found = [line for line in lines if word in line]
        return LOOKUP_JSON_PROMPT.format(word=word), _dumps({"word": word, "lines": found})
    return READBACK_JSON_PROMPT, _dumps({"lines": [{"number": i, "text": line} for i, line in enumerate(lines, 1)]})


def readback_rows(count: int, folder: Path, grounded: bool, processor: Any, max_length: int) -> tuple[list[dict], int]:
    """``count`` pre-training conversations (pages rendered over every core into ``folder``) and
    how many were dropped for not fitting ``max_length`` (never cut, as phase 5 does)."""
    seeds = [(PRETRAIN_SEED + i, PREFIX) for i in range(count)]
    pages = process_map(generated_png, seeds, desc="rendering pre-training pages")
    rows, dropped = [], 0
    for (seed, _), page in zip(seeds, pages, strict=True):
        doc = generate_document(seed, prefix=PREFIX)
        lines = page_lines(doc.text)
        instruction, answer = readback_task(lines, random.Random(seed + 1), columns(doc.text))
        prompt = ocr_grounded(instruction, ocr_like(lines, random.Random(seed))) if grounded else instruction
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        image = f"{doc.doc_id}.png"
        atomic_write_bytes(folder / image, page)
        with Image.open(io.BytesIO(page)) as img:
            size = img.size
        if token_count(processor, messages, size)[0] > max_length:
            dropped += 1
            continue
        rows.append({"id": doc.doc_id, "image": image, "messages": messages})
    return rows, dropped


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def answer_accuracy(model: Any, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Teacher-forced next-token accuracy and mean loss over the answer tokens of held-out pages:
    how much of a page's text the model gives back right, token by token."""
    model.eval()
    right = total = 0
    loss_sum = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, outputs = answer_only_loss(model, batch, labels)
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        targets = targets[:, keep]
        mask = targets != IGNORE_INDEX
        right += int((outputs.logits.argmax(-1)[mask] == targets[mask]).sum())
        total += int(mask.sum())
        loss_sum += float(loss) * int(mask.sum())
    model.train()
    return {"token_accuracy": right / max(total, 1), "loss": loss_sum / max(total, 1), "tokens": total}


def pretrain(model_dir: Path, settings: Settings, pages_dir: Path) -> dict[str, Any]:
    """Pre-train the stand-in in ``model_dir`` in place (its weights rewritten in their saved
    dtype); returns what was done and measured, also written to ``model_dir/pretraining.json``."""
    m, t = settings.model, settings.train
    grounded = settings.data.ocr_grounded_prompt
    started = time.perf_counter()
    processor = load_processor(model_dir, settings, padding_side="right")
    rows, dropped = readback_rows(m.pretrain_documents, pages_dir, grounded, processor, t.max_length)
    if len(rows) < HELD_OUT + m.pretrain_batch_size:
        raise ValueError(f"only {len(rows)} pre-training pages fit train.max_length={t.max_length} "
                         f"({dropped} dropped); raise model.pretrain_documents or train.max_length")
    held_out, train_rows = rows[:HELD_OUT], rows[HELD_OUT:]
    data_s = time.perf_counter() - started

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved_dtype = json.loads((model_dir / "config.json").read_text()).get("dtype", "float32")
    model = load_model(model_dir, settings, dtype=torch.float32, device_map={"": 0 if device.type == "cuda" else "cpu"})
    model.train()
    collator = VisionChatCollator(processor, t.max_length, pages_dir, pad_to_multiple_of=64)
    workers = t.dataloader_workers
    loader = torch.utils.data.DataLoader(
        _Rows(train_rows), batch_size=m.pretrain_batch_size, shuffle=True, drop_last=True, collate_fn=collator,
        num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator().manual_seed(m.seed))
    held_out_batches = [collator(held_out[i:i + 8]) for i in range(0, len(held_out), 8)]
    before = answer_accuracy(model, held_out_batches, device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=m.pretrain_learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device.type == "cuda")
    warmup = max(1, m.pretrain_steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, m.pretrain_steps, warmup))
    losses: list[tuple[int, float]] = []
    tokens = 0
    train_started = time.perf_counter()
    progress = tqdm(total=m.pretrain_steps, desc="pre-training", unit="step", mininterval=5)
    step = 0
    while step < m.pretrain_steps:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = answer_only_loss(model, batch, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step == 1 or step % 25 == 0 or step == m.pretrain_steps:
                losses.append((step, loss.item()))
                progress.set_postfix(loss=f"{losses[-1][1]:.3f}")
            progress.update(1)
            if step >= m.pretrain_steps:
                break
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - train_started
    after = answer_accuracy(model, held_out_batches, device)

    model.to(getattr(torch, saved_dtype)).save_pretrained(model_dir, safe_serialization=True)
    result = {
        "task": ("read a page's printed lines back, all of them, those holding a word, its labelled lines, a "
                 "heading's lines or its columns' cells (plain lines or JSON of keys of its own; never the record's "
                 "keys or shape)"),
        "prompt": ("OCR-grounded: the page's lines, some with their spaces dropped as PP-OCR drops them, before the "
                   "instruction" if grounded else "image and instruction"),
        "instructions": [READBACK_PROMPT, LOOKUP_PROMPT, READBACK_JSON_PROMPT, LOOKUP_JSON_PROMPT, LABELS_JSON_PROMPT,
                         SECTION_JSON_PROMPT, TABLE_JSON_PROMPT],
        "document_seeds": [PRETRAIN_SEED, PRETRAIN_SEED + m.pretrain_documents - 1],
        "pages": len(train_rows), "held_out_pages": len(held_out), "dropped_too_long": dropped,
        "steps": m.pretrain_steps, "batch_size": m.pretrain_batch_size, "learning_rate": m.pretrain_learning_rate,
        "tokens_seen": tokens, "tokens_per_s": tokens / train_s if train_s else None,
        "data_s": data_s, "train_s": train_s, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "loss_curve": losses, "held_out_before": before, "held_out_after": after, "saved_dtype": saved_dtype,
    }
    atomic_write_json(model_dir / "pretraining.json", result)
    log.info("pre-trained %d steps in %.1f s: held-out answer-token accuracy %.3f -> %.3f, loss %.3f -> %.3f",
             m.pretrain_steps, train_s, before["token_accuracy"], after["token_accuracy"], before["loss"], after["loss"])
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
