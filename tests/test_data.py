"""Phase 5: adapters parse each dataset's real schema; filtering, no leakage, determinism."""

import io
import json
import random
import zipfile
from collections import Counter

from PIL import Image

from medvl import data
from medvl.documents import benchmark_documents, generate_document
from medvl.evalsuite import evaluation_documents
from medvl.gates import check_phase
from medvl.workdir import Workdir

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
    samples = data.parse_rows("roco", rows, random.Random(0), 50, report)
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
        samples = data.parse_rows("pubmedvision", rows, random.Random(0), 50, report, read_image)
    assert [s.sample_id for s in samples] == ["pmv-a1"]
    assert samples[0].prompt == "What does the radiograph show?" and samples[0].answer == answer
    assert report.discarded == Counter({"unreadable image": 1, "missing image": 1, "text too short": 1})


def test_mtsamples_rows_are_rendered_to_pages():
    transcription = ("PREOPERATIVE DIAGNOSIS: Acute appendicitis.\nPROCEDURE: Laparoscopic appendectomy.\n"
                     "The patient tolerated the procedure well and was taken to recovery in stable condition.")
    rows = [
        {"id": "m1", "text": transcription, "inputs": {"text": transcription},
         "prediction": [{"label": " Surgery", "score": 1.0}], "metrics": {"text_length": len(transcription)}},
        {"id": "m2", "text": "Too short.", "prediction": [{"label": "Surgery", "score": 1.0}]},
    ]
    report = data.SourceReport("mtsamples")
    samples = data.parse_rows("mtsamples", rows, random.Random(0), 50, report)
    assert len(samples) == 1 and report.discarded == Counter({"text too short": 1})
    page = Image.open(io.BytesIO(samples[0].image_bytes))
    assert page.size[0] == 1000 and page.convert("L").getextrema()[0] < 100  # real ink on a white page
    assert samples[0].answer.startswith("Medical specialty: Surgery")
    assert "Laparoscopic appendectomy" in samples[0].answer


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
    assert len(summary["prompt_distribution"]) >= 10
    protected = data.protected_hashes(tiny_settings)
    for name in ("train", "val", "test"):
        for row in json.loads((wd.datasets / "formatted" / f"{name}.json").read_text()):
            _, kind, seed = row["id"].split("-")
            assert data.text_hash(generate_document(int(seed), kind).text) not in protected
            assert row["messages"][0]["content"][0] == {"type": "image"}
            assert json.loads(row["messages"][1]["content"][0]["text"])  # structured JSON answer
