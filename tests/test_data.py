"""Phase 5: adapters parse each dataset's real schema; filtering, no leakage, determinism."""

import io
import json
import random
import zipfile
from collections import Counter

from PIL import Image

from medvl.core.settings import DataSettings
from medvl.core.workdir import Workdir
from medvl.medical.documents import benchmark_documents, generate_document
from medvl.medical.suite import evaluation_documents
from medvl.pipeline.gates import check_phase
from medvl.training import data

LONG_CAPTION = "Axial CT of the chest shows a 3 cm spiculated mass in the right upper lobe."


def jpeg_bytes(color=(120, 120, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_roco_rows_in_hub_schema():
    # The hub's parquet rows, read with Image(decode=False): image = {"bytes", "path"}.
    rows = [
        {"image": {"bytes": jpeg_bytes(), "path": "PMC1_1.jpg"}, "image_id": "ROCO_00001", "caption": LONG_CAPTION},
        {"image": {"bytes": b"\xff\xd8\xff\xe0 not really a jpeg", "path": "x.jpg"}, "image_id": "ROCO_00002",
         "caption": LONG_CAPTION},
        {"image": {"bytes": jpeg_bytes((10, 10, 10)), "path": "y.jpg"}, "image_id": "ROCO_00003", "caption": "CT chest."},
        {"image": None, "image_id": "ROCO_00004", "caption": LONG_CAPTION},
    ]
    report = data.SourceReport("roco")
    samples = data.parse_rows("roco", rows, random.Random(0), DataSettings(), report)
    assert [s.sample_id for s in samples] == ["roco-ROCO_00001"]
    assert samples[0].answer == LONG_CAPTION and samples[0].prompt
    assert report.rows_read == 4 and report.kept == 1
    assert report.discarded == Counter({"unreadable image": 1, "text too short": 1, "missing image": 1})


def test_pubmedvision_rows_with_images_from_the_zip_archive(tmp_path):
    archive = tmp_path / "images_0.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images/pmc_good.jpg", jpeg_bytes())
        zf.writestr("images/pmc_broken.jpg", b"truncated")
    with zipfile.ZipFile(archive) as zf:
        names = {n.split("/")[-1]: n for n in zf.namelist()}

        def read_image(path: str):
            name = path.split("/")[-1]
            return zf.read(names[name]) if name in names else None

        answer = "The chest radiograph shows bilateral interstitial opacities consistent with edema."
        rows = [
            {"id": "a1", "image": ["images/pmc_good.jpg"], "modality": "X-ray", "body_part": "Chest",
             "conversations": [{"from": "human", "value": "<image>\nWhat does the radiograph show?"},
                               {"from": "gpt", "value": answer}]},
            {"id": "a2", "image": ["images/pmc_broken.jpg"],
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": answer}]},
            {"id": "a3", "image": ["images/absent.jpg"],
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": answer}]},
            {"id": "a4", "image": ["images/pmc_good.jpg"],
             "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "Edema."}]},
        ]
        report = data.SourceReport("pubmedvision")
        samples = data.parse_rows("pubmedvision", rows, random.Random(0), DataSettings(), report, read_image)
    assert [s.sample_id for s in samples] == ["pmv-a1"]
    assert samples[0].prompt == "What does the radiograph show?" and samples[0].answer == answer
    assert report.discarded == Counter({"unreadable image": 1, "missing image": 1, "text too short": 1})


def test_pubmedvision_rows_with_several_images_or_no_id():
    """Several images: discarded and counted (one image per sample fits the token budget).
    No id: one from the row's content, distinct per row and stable."""
    answer = "The axial CT shows a hypodense lesion in the right hepatic lobe with rim enhancement."

    def row(paths, text=answer):
        return {"image": paths, "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                  {"from": "gpt", "value": text}]}

    rows = [row(["images/a.jpg", "images/b.jpg"]), row(["images/a.jpg"]), row(["images/b.jpg"]),
            row(["images/a.jpg"], answer + " No ascites.")]
    report = data.SourceReport("pubmedvision")
    samples = data.parse_rows("pubmedvision", rows, random.Random(0), DataSettings(), report, lambda _: jpeg_bytes())
    assert report.discarded == Counter({"several images": 1})
    ids = [s.sample_id for s in samples]
    assert len(ids) == 3 and len(set(ids)) == 3 and all(i.startswith("pmv-") and "None" not in i for i in ids)
    again = data.parse_rows("pubmedvision", rows, random.Random(0), DataSettings(), data.SourceReport("p"),
                            lambda _: jpeg_bytes())
    assert [s.sample_id for s in again] == ids


def test_mtsamples_rows_are_rendered_to_pages():
    transcription = ("PREOPERATIVE DIAGNOSIS: Acute appendicitis.\nPROCEDURE: Laparoscopic appendectomy.\n"
                     "The patient tolerated the procedure well and was taken to recovery in stable condition.")
    rows = [
        {"id": "m1", "text": transcription, "inputs": {"text": transcription},
         "prediction": [{"label": " Surgery", "score": 1.0}], "metrics": {"text_length": len(transcription)}},
        {"id": "m2", "text": "Too short.", "prediction": [{"label": "Surgery", "score": 1.0}]},
    ]
    report = data.SourceReport("mtsamples")
    samples = data.parse_rows("mtsamples", rows, random.Random(0), DataSettings(), report)
    assert len(samples) == 1 and report.discarded == Counter({"text too short": 1})
    page = Image.open(io.BytesIO(samples[0].image_bytes))
    assert page.size[0] == 1000 and page.convert("L").getextrema()[0] < 100  # real ink on a white page
    assert samples[0].answer.startswith("Medical specialty: Surgery")
    assert "Laparoscopic appendectomy" in samples[0].answer


def test_a_long_transcription_becomes_pages_that_fit(tiny_model_dir, tiny_settings):
    """An MTSamples row of 2,400 characters (the longest ~45% of the 7b set had) becomes
    pages whose answers all fit max_length beside the page image; none is cut, and pages of one
    transcription stay in one split."""
    from medvl.model.loading import load_processor

    sentence = "The patient is a 67-year-old male with hypertension, on lisinopril 10 mg daily. "
    transcription = "HISTORY OF PRESENT ILLNESS:\n" + sentence * 30  # 2,400+ characters
    rows = [{"id": "m9", "text": transcription, "prediction": [{"label": "Cardiology"}]}]
    settings = DataSettings(mtsamples_page_chars=600, mtsamples_pages_per_row=10)
    samples = data.parse_rows("mtsamples", rows, random.Random(0), settings, data.SourceReport("mtsamples"))
    assert len(samples) >= 4 and len({s.group for s in samples}) == 1
    pages = [s.answer.split("Transcription:\n", 1)[1] for s in samples]
    assert all(len(page) <= 600 for page in pages)
    assert " ".join(" ".join(pages).split()) == " ".join(transcription.split())  # nothing dropped
    processor = load_processor(tiny_model_dir, tiny_settings, padding_side="right")
    kept, report = data.drop_too_long(samples, processor, max_length=1024)
    assert report["too_long"] == 0 and len(kept) == len(samples)
    # The whole transcription on one page does not fit: that sample is dropped, not cut.
    whole = DataSettings(mtsamples_page_chars=5000)
    one = data.parse_rows("mtsamples", rows, random.Random(0), whole, data.SourceReport("mtsamples"))
    kept, report = data.drop_too_long(one, processor, max_length=1024)
    assert kept == [] and report["too_long"] == 1 and report["too_long_by_source"] == {"mtsamples": 1}
    # Pages of one transcription never straddle splits.
    others = [s for _, s in data.synthetic_samples(30, random.Random(2))]
    splits = data.split(others + samples, 42, 0.1, 0.1)
    holding = [name for name, part in splits.items() if any(s.group == samples[0].group for s in part)]
    assert len(holding) == 1


def test_protected_and_duplicate_documents_never_enter_a_split(tiny_settings):
    rng = random.Random(0)
    pairs = list(data.synthetic_samples(5, rng))
    leaked = [benchmark_documents(tiny_settings.bench.document_seed, 5)[2], evaluation_documents()[0]]
    leaked_samples = [data.Sample(d.doc_id, "synthetic", data.png_bytes(Image.new("RGB", (8, 8), c)),
                                  "p", d.target_answer(), d.text) for d, c in zip(leaked, ("red", "blue"), strict=True)]
    dup = pairs[0][1]
    counts = Counter()
    kept = data.deduplicate([s for _, s in pairs] + leaked_samples + [dup], data.protected_hashes(tiny_settings), counts)
    assert len(kept) == 5
    assert counts == Counter({"protected (test/eval document)": 2, "duplicate": 1})


def test_split_is_deterministic_and_order_independent():
    samples = [s for _, s in data.synthetic_samples(40, random.Random(1))]
    first = data.split(samples, 42, 0.1, 0.1)
    again = data.split(list(reversed(samples)), 42, 0.1, 0.1)
    other = data.split(samples, 7, 0.1, 0.1)
    ids = {k: [s.sample_id for s in v] for k, v in first.items()}
    assert ids == {k: [s.sample_id for s in v] for k, v in again.items()}
    assert ids != {k: [s.sample_id for s in v] for k, v in other.items()}
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (32, 4, 4)
    assert not set(ids["train"]) & (set(ids["val"]) | set(ids["test"]))


def test_phase5_offline_writes_labelled_synthetic_splits(phases_1_5, tiny_settings):
    wd = Workdir(phases_1_5)
    assert check_phase(5, wd, tiny_settings) == []
    download = json.loads((wd.datasets / "download_summary.json").read_text())
    assert download["offline_fallback"] is True and "synthetic" in download["fallback_note"]
    for name in ("roco", "pubmedvision", "mtsamples"):
        assert download["sources"][name]["status"] == "failed" and download["sources"][name]["attempts"]
    summary = json.loads((wd.datasets / "formatted" / "data_summary.json").read_text())
    assert summary["offline_fallback"] is True
    lengths = summary["length_check"]
    assert lengths["max_length"] == tiny_settings.train.max_length and lengths["too_long"] == 0
    assert lengths["samples_checked"] >= sum(summary["counts"].values())
    assert 0 < lengths["tokens"]["max"] <= tiny_settings.train.max_length
    assert len(summary["prompt_distribution"]) >= 10
    protected = data.protected_hashes(tiny_settings)
    for name in ("train", "val", "test"):
        for row in json.loads((wd.datasets / "formatted" / f"{name}.json").read_text()):
            _, kind, seed = row["id"].split("-")
            assert data.text_hash(generate_document(int(seed), kind).text) not in protected
            assert row["messages"][0]["content"][0] == {"type": "image"}
            assert json.loads(row["messages"][1]["content"][0]["text"])  # structured JSON answer


def test_reviewed_pages_train_once_and_never_as_a_held_out_page(tmp_path):
    """An export of the review store (GET /review/export) becomes training samples: a reviewed
    page trains with the reviewer's record; the same page again, a page of the validation or test
    split, a phase-3 test page, a malformed row and a record the schema refuses do not."""
    import base64
    import hashlib
    import io
    import random
    from collections import Counter

    from PIL import Image

    from medvl.medical.documents import document_png, generate_document
    from medvl.medical.records import record_answer

    def page_png(seed: int) -> bytes:  # as the store keeps it: decoded, then re-encoded
        buffer = io.BytesIO()
        Image.open(io.BytesIO(document_png(generate_document(seed, prefix="rev")))).save(buffer, format="PNG")
        return buffer.getvalue()

    record = {"medications": [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"}],
              "diagnoses": ["CKD 3b"], "procedures": [], "lab_values": [], "vitals": {}}

    def row(doc: str, png: bytes, status: str = "corrected", rec: dict = record) -> str:
        return json.dumps({"document_id": doc, "page": 1, "pages": 1, "status": status, "record": rec,
                           "page_sha256": hashlib.sha256(png).hexdigest(),
                           "image_png_base64": base64.b64encode(png).decode()})

    reviewed, held_out, test_page = page_png(1), page_png(2), page_png(3)
    protected_dir = tmp_path / "test_images"
    protected_dir.mkdir()
    (protected_dir / "lab.png").write_bytes(document_png(generate_document(3, prefix="rev")))
    export = tmp_path / "export.jsonl"
    export.write_text("\n".join([
        row("a" * 32, reviewed), row("b" * 32, reviewed, "accepted"), row("c" * 32, held_out),
        row("d" * 32, test_page), '{"document_id": "e", "page": 1, "image_png_base64": "%%%"}',
        row("f" * 32, page_png(4), rec={**record, "allergies": ["penicillin"]})]) + "\n")

    report = data.SourceReport("reviewed")
    samples, statuses = data.reviewed_samples(export, random.Random(0), report)
    assert report.rows_read == 6 and len(samples) == 4 and sum(report.discarded.values()) == 2
    assert statuses["a" * 32] == "corrected" and statuses["b" * 32] == "accepted"
    assert samples[0].answer == record_answer(record) and samples[0].source == "reviewed"
    splits = {"train": [], "val": [data.Sample("v", "synthetic", held_out, "p", "a", "t")], "test": []}
    counts: Counter = Counter()
    admitted = data.admit_reviewed(samples, splits, data.protected_pixels(protected_dir), counts)
    assert [s.group for s in admitted] == ["a" * 32]
    assert counts == {"reviewed: duplicate page": 1, "reviewed: a validation, test or evaluation page": 2}
