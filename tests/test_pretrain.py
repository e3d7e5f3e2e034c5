"""Phase 2's pre-training of a stand-in (the `small` profile's base): it learns to read pages
back, and it never sees the record."""

from __future__ import annotations

import json
import shutil

from medvl.core.settings import load_settings
from medvl.medical.documents import CALIBRATION_SEED, PRETRAIN_SEED, SYNTHETIC_SEED
from medvl.medical.prompts import OCR_HEADER
from medvl.training import pretrain


def test_pretraining_lowers_the_held_out_loss_and_never_shows_the_record(tiny_model_dir, tmp_path):
    settings = load_settings("tiny", ["model.pretrain_steps=30", "model.pretrain_documents=64",
                                      "model.pretrain_batch_size=4", "model.pretrain_learning_rate=3e-3",
                                      "data.ocr_grounded_prompt=true"])
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = (model_dir / "model.safetensors").read_bytes()
    pages = tmp_path / "pages"
    pages.mkdir()
    result = pretrain.pretrain(model_dir, settings, pages)

    assert result["steps"] == 30 and result["pages"] + result["held_out_pages"] + result["dropped_too_long"] == 64
    assert result["held_out_after"]["loss"] < result["held_out_before"]["loss"] - 1.0
    assert result["held_out_after"]["token_accuracy"] > result["held_out_before"]["token_accuracy"]
    assert (model_dir / "model.safetensors").read_bytes() != before  # rewritten in place, saved dtype kept
    assert json.loads((model_dir / "pretraining.json").read_text())["saved_dtype"] == "float32"

    rows, _ = pretrain.readback_rows(16, pages, True, _processor(model_dir, settings), 1024)
    asked = set()
    for row in rows:
        prompt, answer = row["messages"][0]["content"][1]["text"], row["messages"][1]["content"][0]["text"]
        read, instruction = prompt.split("\n", 1)[1].rsplit("\n\n", 1)  # the OCR-like lines, the instruction
        assert prompt.startswith(OCR_HEADER) and answer
        if instruction == pretrain.READBACK_PROMPT:
            assert answer.replace(" ", "") == read.replace(" ", "")  # every line, given back spaced
        else:  # the lines holding the word, given back spaced, in page order
            word = instruction.split('"')[1]
            assert all(word in line for line in answer.splitlines())
            assert answer.replace(" ", "") in read.replace(" ", "") or len(answer.splitlines()) > 1
        asked.add(instruction == pretrain.READBACK_PROMPT)
        assert "\n".join(pretrain.page_lines(answer)) == answer
        assert '"medications"' not in answer and "{" not in answer  # plain text: never the record's JSON
    assert asked == {True, False}  # both tasks
    # its pages are nobody else's: phase 5's and AWQ's seeds lie far below
    assert PRETRAIN_SEED > CALIBRATION_SEED + 100_000 > SYNTHETIC_SEED + 100_000


def test_ocr_like_drops_spaces_only():
    import random

    lines = ["Metformin 500 mg PO BID", "BP 120/80 mmHg HR 70 bpm"] * 20
    read = pretrain.ocr_like(lines, random.Random(0))
    assert [r.replace(" ", "") for r in read] == [line.replace(" ", "") for line in lines]
    assert read != lines and any(r == line for r, line in zip(read, lines, strict=True))


def test_page_lines_are_what_the_grounded_prompt_gives():
    assert pretrain.page_lines("Title\n\nBP 120/80 mmHg    HR 70 bpm\n   \n  Disp: #30  Refills: 0") == [
        "Title", "BP 120/80 mmHg HR 70 bpm", "Disp: #30 Refills: 0"]


def _processor(model_dir, settings):
    from medvl.model.loading import load_processor

    return load_processor(model_dir, settings, padding_side="right")
