"""The OCR + rules baseline: the rules on OCR-like lines, and the real OCR engine on a page."""

from dataclasses import replace

import numpy as np
import pytest

from medvl.evaluation import scoring
from medvl.medical import ocr
from medvl.medical.documents import benchmark_documents, render_document


def test_rules_read_ocr_lines_without_their_spaces():
    """PP-OCR drops spaces and boxes table cells apart (read_lines rejoins a row): the rules allow both."""
    lines = ["Metformin500mgPOBID", "Lisinopril 10 mg PO QD", "Chloride 72 mmol/ L 98-107 L",
             "TSH 2.33 mIU/L 0.40-4.00", "BP 172/99 mmHg HR 63 bpmTemp37.8C", "RR 13 /minSp02 92% on RA",
             "Assessment: HTN, Type 2 diabetes mellitus", "Exam:CT head without contrast",
             "-No intracranialhemorrhage.", "1.AcuteleftMCAinfarct."]
    record = ocr.record_from_lines(lines)
    assert record["medications"][:2] == [
        {"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"},
        {"name": "Lisinopril", "dose": "10 mg", "route": "PO", "frequency": "QD"}]
    assert record["lab_values"] == [
        {"name": "Chloride", "value": "72", "unit": "mmol/L", "flag": "L", "reference_range": "98-107"},
        {"name": "TSH", "value": "2.33", "unit": "mIU/L", "flag": "", "reference_range": "0.40-4.00"}]
    assert record["vitals"] == {"blood_pressure": "172/99 mmHg", "heart_rate": "63 bpm", "temperature": "37.8 C",
                                "respiratory_rate": "13 /min", "spo2": "92% on RA"}
    assert "HTN" in record["diagnoses"] and "Type 2 diabetes mellitus" in record["diagnoses"]
    # a radiology report's diagnosis is what its impression concludes, not every finding it rules out
    assert "Acute left MCA infarct" in record["diagnoses"] and "hemorrhage" not in record["diagnoses"]


@pytest.mark.parametrize("kind", ["lab_results", "prescription"])
def test_ocr_baseline_reads_a_rendered_page(kind):
    doc = next(d for d in benchmark_documents(1234) if d.kind == kind)
    out = ocr.extract(render_document(doc))
    result = scoring.score_record(out["response"], doc.structured())
    figures = scoring.record_figures(result.totals())
    assert figures["recall"] >= 0.8 and figures["precision"] >= 0.8, (result.missed, result.invented)
    assert out["ocr_s"] > 0


def test_grounded_prompts_put_the_pages_ocr_text_before_the_instruction(tmp_path, monkeypatch):
    """data.ocr_grounded_prompt: phase 5 writes the page's OCR lines into each training prompt,
    the instruction stays recoverable (the data summary counts instructions), and phase 7 grounds
    the suite's prompts with the lines its OCR baseline read (test rows come grounded)."""
    from medvl.evaluation import evaluate
    from medvl.medical import prompts
    from medvl.training import data

    doc = next(d for d in benchmark_documents(1234) if d.kind == "prescription")
    sample = data.Sample("syn-x", "synthetic", data.png_bytes(render_document(doc)), "List the drugs.", "{}", "x")
    grounded = data.ground_prompts([sample])[0]
    assert grounded.prompt.startswith(prompts.OCR_HEADER) and grounded.prompt.endswith("\n\nList the drugs.")
    assert all(m["name"].lower() in grounded.prompt.lower().replace(" ", "") for m in doc.medications)
    assert prompts.instruction_of(grounded.prompt) == "List the drugs."

    # a page read before is taken from the cache, not read again, and grounds the same prompt
    cache = tmp_path / "ocr_cache"
    first = data.ground_prompts([sample, replace(sample, sample_id="syn-y", prompt="Other.")], cache)
    assert first[0].prompt == grounded.prompt and len(list(cache.rglob("*.json"))) == 1  # one page
    monkeypatch.setattr(ocr, "read_pages", lambda *_, **__: pytest.fail("a cached page was read again"))
    again = data.ground_prompts([sample], cache)
    assert again[0].prompt == grounded.prompt
    # another runtime's reading is never taken for this one's: the key names the reader
    (key_file,) = cache.rglob("*.json")
    assert key_file.name.startswith(f"{ocr.reader()}-") and "-onnxruntime-cpu-" in key_file.name

    suite = scoring.Case("s1", "suite", "suite", "s1.png", "Extract.", doc.structured())
    test_row = scoring.Case("t1", "test", "synthetic", "t1.png", grounded.prompt, doc.structured())
    baseline = {"cases": [{"subset": "suite", "case_id": "s1", "ocr_lines": ["Aspirin 81 mg"]},
                          {"subset": "test", "case_id": "t1", "ocr_lines": ["unused"]}]}
    cases = evaluate.ocr_grounded_cases([suite, test_row], baseline)
    assert cases[0].prompt == prompts.ocr_grounded("Extract.", ["Aspirin 81 mg"]) and cases[1] is test_row


def test_the_torch_backend_reads_the_phase3_pages_as_onnx_runtime_does():
    """api.ocr_backend=torch (the GPU path, here on the CPU): on each phase-3 page the same runs of
    text as ONNX Runtime's, each box within a pixel, and one more page read per backend never
    reuses the other's engine."""
    pages = [render_document(doc) for doc in benchmark_documents(1234, 5)]
    readings = {}
    try:
        for backend in ("onnxruntime", "torch"):
            ocr.use_backend(backend)
            assert ocr.backend() == backend and ("PyTorch" in ocr.describe()) == (backend == "torch")
            readings[backend] = [ocr.read_boxes(page) for page in pages]
    finally:
        ocr.use_backend("auto")
    assert type(ocr.load().text_det.infer).__name__ == "OrtInferSession"  # auto on a CPU host
    for reference, torch_runs in zip(readings["onnxruntime"], readings["torch"], strict=True):
        assert len(reference) > 10
        assert [text for text, _ in torch_runs] == [text for text, _ in reference]
        for (_, box), (_, expected) in zip(torch_runs, reference, strict=True):
            assert max(abs(a - b) for a, b in zip(box, expected, strict=True)) <= 1, (box, expected)


def test_an_unknown_ocr_backend_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, onnxruntime, torch"):
        ocr.use_backend("tensorrt")


def test_the_ocr_backend_setting_is_validated():
    from medvl.core.settings import SettingsError, load_settings

    assert load_settings("tiny", ["api.ocr_backend=torch"]).api.ocr_backend == "torch"
    with pytest.raises(SettingsError, match="api.ocr_backend must be one of auto, onnxruntime, torch"):
        load_settings("tiny", ["api.ocr_backend=tensorrt"])


def test_phase_5_reads_pages_with_a_worker_per_core_or_a_few_sharing_the_gpu(monkeypatch):
    """ONNX Runtime: a process per core, one thread each; torch on a GPU: a few processes (each
    holds a CUDA context) splitting the cores between them; torch on a CPU reads as ONNX Runtime."""
    from medvl.core import parallel

    monkeypatch.setattr(parallel, "cores", lambda: 16)
    assert ocr.worker_plan("onnxruntime", "cpu") == (16, 1)
    assert ocr.worker_plan("torch", "cpu") == (16, 1)
    assert ocr.worker_plan("torch", "cuda") == (ocr.GPU_WORKERS, 16 // ocr.GPU_WORKERS)
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert ocr.worker_plan("torch", "cuda") == (2, 1)


def test_a_line_too_wide_for_the_recognizer_is_read_in_pieces_not_dropped():
    """PP-OCR read this page's 76-character "Hospital course" line as "a  oi o t o  e  o s" (score
    0.46) and dropped it with its two lab values; read in pieces cut between words, it comes back."""
    from medvl.medical.documents import generate_document

    doc = generate_document(100008, prefix="syn")
    (printed,) = [line for line in doc.lines if line.startswith("Hospital course")]
    assert printed in ocr.read_lines(render_document(doc))


def test_word_cuts_end_pieces_in_gaps_and_keep_them_narrow():
    import numpy as np

    height = 10
    crop = np.full((height, 400, 3), 255, dtype=np.uint8)
    words = [(0, 70), (75, 150), (160, 230), (236, 330), (338, 400)]  # inked columns, gaps between
    for start, end in words:
        crop[2:8, start:end] = 0
    cuts = ocr.word_cuts(crop)
    assert cuts[0][0] == 0 and cuts[-1][1] == 400
    assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:], strict=False))  # contiguous
    assert all(end - start <= ocr.PIECE_RATIO * height for start, end in cuts)
    inked = {c for start, end in words for c in range(start, end)}
    assert not {end for _, end in cuts[:-1]} & inked  # every cut falls between words
    solid = np.zeros((height, 400, 3), dtype=np.uint8)  # no gap at all: cut at the widest piece
    assert ocr.word_cuts(solid)[0] == (0, int(ocr.PIECE_RATIO * height))


def test_a_reading_pool_reads_pages_at_once_as_this_process_does_and_outlives_a_dead_worker():
    """api.ocr_workers: pages read in worker processes give this process's runs; two requests'
    pages are read at once; a worker killed mid-service costs no reading (the pool restarts)."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from medvl.medical.documents import generate_document

    pages = [render_document(doc) for doc in benchmark_documents(1234, 2)]
    here = [ocr.read_pixels(np.asarray(page)) for page in pages]
    ocr.use_backend("onnxruntime")
    try:
        pool = ocr.use_pool(2, wait=False)  # as a server starts it: beside the model's load
        assert ocr.pages_at_once() == 2
        pool.wait_warm()
        with ThreadPoolExecutor(2) as threads:
            assert list(threads.map(ocr.read_boxes, pages)) == here
        os.kill(next(iter(pool._executor._processes)), signal.SIGKILL)
        wide = render_document(generate_document(100008, prefix="syn"))
        assert ocr.read_boxes(pages[0]) == here[0]  # the pool started again
        assert any(text.startswith("Hospital course") for text, _ in ocr.read_boxes(wide))
    finally:
        ocr.use_pool(0)
        ocr.use_backend("auto")
    assert ocr.pages_at_once() == 1


def test_a_server_reads_in_worker_processes_when_its_ocr_runs_on_a_gpu(monkeypatch):
    monkeypatch.setattr(ocr, "backend", lambda: "torch")
    monkeypatch.setattr(ocr, "device", lambda: "cuda")
    assert ocr.serving_workers(-1) == ocr.GPU_WORKERS and ocr.serving_workers(0) == 0
    monkeypatch.setattr(ocr, "device", lambda: "cpu")
    assert ocr.serving_workers(-1) == 0 and ocr.serving_workers(3) == 3
