"""Phase 2's pre-training of a stand-in (the `small` profile's base): it learns to read pages
back, and it never sees the record."""

from __future__ import annotations

import json
import re
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

    rows, _ = pretrain.readback_rows(48, pages, True, _processor(model_dir, settings), 1024)
    asked = set()
    for row in rows:
        prompt, answer = row["messages"][0]["content"][1]["text"], row["messages"][1]["content"][0]["text"]
        read, instruction = prompt.split("\n", 1)[1].rsplit("\n\n", 1)  # the OCR-like lines, the instruction
        assert prompt.startswith(OCR_HEADER) and answer
        asked.add(_task(instruction))
        _check_answer(instruction, read, answer)
    assert asked == {"readback", "lookup", "readback_json", "lookup_json", "labels_json", "section_json", "table_json"}
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


def _task(instruction: str) -> str:
    fixed = {pretrain.READBACK_PROMPT: "readback", pretrain.READBACK_JSON_PROMPT: "readback_json",
             pretrain.LABELS_JSON_PROMPT: "labels_json", pretrain.TABLE_JSON_PROMPT: "table_json"}
    if instruction in fixed:
        return fixed[instruction]
    quoted = instruction.split('"')[1]
    if instruction == pretrain.SECTION_JSON_PROMPT.format(heading=quoted):
        return "section_json"
    return "lookup" if instruction == pretrain.LOOKUP_PROMPT.format(word=quoted) else "lookup_json"


def _keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def _check_answer(instruction: str, read: str, answer: str) -> None:
    """Each task's answer is the OCR-read page's text given back spaced as printed, and no answer
    carries a key of the record."""
    task, spaceless = _task(instruction), read.replace(" ", "")
    if task in ("readback", "lookup"):  # plain lines, never JSON
        assert "\n".join(pretrain.page_lines(answer)) == answer and "{" not in answer
        lines = answer.splitlines()
    else:
        parsed = json.loads(answer)
        assert not _keys(parsed) & _record_keys()
        if task == "readback_json":
            assert [item["number"] for item in parsed["lines"]] == list(range(1, len(parsed["lines"]) + 1))
            lines = [item["text"] for item in parsed["lines"]]
        elif task == "lookup_json":
            lines = parsed["lines"]
            assert parsed["word"] == instruction.split('"')[1]
        elif task == "table_json":  # lines in columns, in order, each cut into its cells
            assert len(parsed) >= 1 and all(len(row) >= 3 and all(cell for cell in row) for row in parsed)
            page = spaceless.split("\n")  # each row is one printed line of the page, in page order
            positions = [page.index("".join(row).replace(" ", "")) for row in parsed]
            assert positions == sorted(positions)
            return
        elif task == "section_json":  # the heading's lines, in order, their list markers dropped
            heading = instruction.split('"')[1].replace(" ", "")
            assert parsed and all(isinstance(line, str) and line for line in parsed)
            after = spaceless[spaceless.index(heading + "\n") + len(heading):]
            assert "".join(parsed).replace(" ", "") in re.sub(r"\n(?:\d+[.)]|-)", "", after).replace("\n", "")
            return
        else:
            assert parsed and all(f"{label}:{text}".replace(" ", "") in spaceless for label, text in parsed.items())
            return
    if task.startswith("readback"):
        assert "".join(lines).replace(" ", "") == spaceless.replace("\n", "")  # every line, in order
    else:  # the lines holding the word, in page order
        word = instruction.split('"')[1]
        assert lines and all(word in line for line in lines)
        assert all(line.replace(" ", "") in spaceless for line in lines)


def _record_keys() -> set[str]:
    from medvl.medical.records import RECORD_SCHEMA

    return set(RECORD_SCHEMA["properties"]) | {k for d in RECORD_SCHEMA["$defs"].values() for k in d["properties"]}


def _processor(model_dir, settings):
    from medvl.model.loading import load_processor

    return load_processor(model_dir, settings, padding_side="right")


def test_columns_are_a_tables_cells_and_only_lines_in_three_or_more():
    text = ("Laboratory Results\nPatient: A B    MRN: 1    Age/Sex: 5 F\nDate: x    Attending: y\n"
            "Test                 Result  Unit      Ref range     Flag\n"
            "Troponin I             0.06  ng/mL     0.00-0.04     H\n"
            "Sodium                  140  mmol/L    135-145       \n")
    assert pretrain.columns(text) == [["Patient: A B", "MRN: 1", "Age/Sex: 5 F"],
                                      ["Test", "Result", "Unit", "Ref range", "Flag"],
                                      ["Troponin I", "0.06", "ng/mL", "0.00-0.04", "H"],
                                      ["Sodium", "140", "mmol/L", "135-145"]]


def test_sections_are_a_headings_lines_without_their_markers():
    lines = ["Title", "Assessment:", "1. Community-acquired pneumonia", "2.COPD", "Plan / Medications:",
             "- Amoxicillin 875 mg PO TID", "Empty:", "Vitals:", "BP 120/80 mmHg"]
    assert pretrain.sections(lines) == {"Assessment:": ["Community-acquired pneumonia", "COPD"],
                                        "Plan / Medications:": ["Amoxicillin 875 mg PO TID"],
                                        "Vitals:": ["BP 120/80 mmHg"]}
