"""One page, three paths, one prompt: what training, phase 7 and /extract give the model.

A model is only measured right if phase 7 asks it what training taught it to answer, and only
served right if /extract asks it the same (issue 43): a different template, pixel budget or OCR
grounding in one of them would go unseen by any score. Each path is run as the pipeline runs
it, on a phase-5 test row of an OCR-grounded profile.
"""

from __future__ import annotations

import dataclasses

import torch

from medvl.core.settings import load_settings
from medvl.engine.loader import ServedModel, build_engine
from medvl.engine.pages import PageLimits, decode_pages
from medvl.evaluation import evaluate
from medvl.medical.documents import benchmark_documents, render_document
from medvl.medical.prompts import EXTRACTION_PROMPT, OCR_HEADER
from medvl.model.loading import load_model, load_processor
from medvl.training import data
from medvl.training.trainer import VisionChatCollator, answer_header


def test_training_phase7_and_extract_give_the_model_the_same_tokens_and_pixels(tiny_model_dir, tmp_path):
    settings = load_settings("tiny", ["data.ocr_grounded_prompt=true"])
    doc = next(d for d in benchmark_documents(4321) if d.kind == "lab_results")
    sample = data.Sample("syn-lab", "synthetic", data.png_bytes(render_document(doc)), "List the labs.",
                         doc.target_answer(), doc.text)
    # phase 5: the test split asked what /extract asks, grounded by OCR, written as a conversation
    (row,) = data.write_splits({"test": data.ground_prompts(data.as_served([sample]))}, tmp_path)["test"]
    assert row["messages"][0]["content"][1]["text"].startswith(OCR_HEADER)

    # training: the collator's tokens up to the assistant header are the prompt the model reads
    trained = VisionChatCollator(load_processor(tiny_model_dir, settings, padding_side="right"), 1024,
                                 tmp_path).encode(row)
    ids = trained["input_ids"].tolist()
    header = answer_header(load_processor(tiny_model_dir, None).tokenizer)
    start = next(i for i in range(len(ids)) if ids[i:i + len(header)] == header) + len(header)
    assert trained["labels"][:start].eq(-100).all() and trained["labels"][start] == ids[start]

    # phase 7: the test case's page rendered as the server reads uploads, prepared by the engine
    model = load_model(tiny_model_dir, settings)
    decode = dataclasses.replace(settings.decode, vision_in_prepare=False)  # keep the pixels to compare
    engine = build_engine(model, load_processor(tiny_model_dir, None), decode, slots=1)
    (case,) = evaluate.test_split_cases(tmp_path, tmp_path, 0)
    limits = PageLimits.from_settings(settings.api)
    (page,) = evaluate.case_pages(tmp_path / case.image, limits)
    evaluated = engine.prepare(page, case.prompt).tensors

    # /extract: the upload's bytes decoded, grounded by the server's own OCR, the same engine
    served = ServedModel(tiny_model_dir, settings)
    (upload,) = decode_pages((tmp_path / row["image"]).read_bytes(), limits)
    asked = engine.prepare(upload, served.prompt_for(upload, EXTRACTION_PROMPT)).tensors

    for prepared in (evaluated, asked):
        assert prepared["input_ids"][0].tolist() == ids[:start]
        assert torch.equal(prepared["image_grid_thw"], trained["image_grid_thw"])
        assert torch.equal(prepared["pixel_values"].float(), trained["pixel_values"].float())
    assert case.prompt == row["messages"][0]["content"][1]["text"] and case.reference == doc.structured()


def test_a_page_left_out_of_grounding_would_be_seen(tiny_model_dir, tmp_path):
    """The comparison above can fail: the same page asked without its OCR text (a server whose
    profile does not ground) gives other tokens than the grounded training row."""
    settings = load_settings("tiny", ["data.ocr_grounded_prompt=true"])
    doc = next(d for d in benchmark_documents(4321) if d.kind == "prescription")
    sample = data.Sample("syn-rx", "synthetic", data.png_bytes(render_document(doc)), "x", doc.target_answer(), doc.text)
    (row,) = data.write_splits({"test": data.ground_prompts(data.as_served([sample]))}, tmp_path)["test"]
    limits = PageLimits.from_settings(settings.api)
    (upload,) = decode_pages((tmp_path / row["image"]).read_bytes(), limits)
    plain = ServedModel(tiny_model_dir, load_settings("tiny")).prompt_for(upload, EXTRACTION_PROMPT)
    assert plain == EXTRACTION_PROMPT != row["messages"][0]["content"][1]["text"]
