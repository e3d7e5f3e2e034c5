"""Plausibility flags and the inference CLI (single file, batch with a corrupt file, interactive)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medvl.medical import flags

from conftest import REPO

PLAUSIBLE = {"medications": [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"}],
             "lab_values": [{"name": "Potassium", "value": "4.5", "unit": "mmol/L", "flag": ""}]}


def rules(structured):
    return [f["rule"] for f in flags.check(structured)]


def test_tables_load_validate_and_name_their_source():
    assert flags.dose_table()["source"] and flags.lab_table()["source"]
    assert len(flags.interaction_table()) >= 10
    assert rules(PLAUSIBLE) == []


@pytest.mark.parametrize(("med", "rule"), [
    ({"name": "Metformin", "dose": "50000 mg", "route": "PO", "frequency": "QD"}, "dose_above_max_single"),
    ({"name": "Metformin", "dose": "1000 mg", "route": "PO", "frequency": "QID"}, "daily_dose_above_max"),
    ({"name": "Acetaminophen", "dose": "1 g", "route": "PO", "frequency": "q4h PRN"}, "daily_dose_above_max"),
    ({"name": "Warfarin", "dose": "0.005 mg", "route": "PO", "frequency": "QD"}, "dose_far_below_usual"),
    ({"name": "Lisinopril", "dose": "10 mg", "route": "PO", "frequency": "every blue moon"}, "unknown_frequency"),
])
def test_each_dose_rule_fires_and_the_plausible_version_stays_silent(med, rule):
    fired = flags.check({"medications": [med]})
    assert rule in [f["rule"] for f in fired]
    assert all(f["item"] == med["name"] and f["reason"] and f["value"] for f in fired)
    plausible = {**med, "dose": "500 mg" if med["name"] == "Metformin" else
                 {"Acetaminophen": "500 mg", "Warfarin": "5 mg", "Lisinopril": "10 mg"}[med["name"]],
                 "frequency": "BID" if med["name"] == "Metformin" else "QD"}
    assert rules({"medications": [plausible]}) == []


def test_frequency_abbreviations_are_understood():
    assert [flags.times_per_day(f) for f in ("BID", "TID", "QID", "QD", "q8h", "q6h PRN", "QHS", "")] == \
        [2, 3, 4, 1, 3, 4, 1, None]
    assert flags.dose_mg("1 g") == 1000 and flags.dose_mg("18 mcg") == pytest.approx(0.018)
    assert flags.dose_mg("1 mg/kg") is None


@pytest.mark.parametrize(("lab", "rule"), [
    ({"name": "K+", "value": "45", "unit": "mmol/L"}, "lab_value_implausible"),
    ({"name": "Sodium", "value": "14", "unit": "mmol/L"}, "lab_value_implausible"),
    ({"name": "Glucose", "value": "9000", "unit": "mg/dL"}, "lab_value_implausible"),
    ({"name": "Creatinine", "value": "1.1", "unit": "g/dL"}, "lab_unit_mismatch"),
    ({"name": "Hemoglobin", "value": "250", "unit": "g/dL"}, "lab_value_implausible"),
])
def test_lab_rules_fire_and_the_plausible_version_stays_silent(lab, rule):
    assert rules({"lab_values": [lab]}) == [rule]
    plausible = {"K+": ("4.1", "mmol/L"), "Sodium": ("140", "mmol/L"), "Glucose": ("180", "mg/dL"),
                 "Creatinine": ("1.1", "mg/dL"), "Hemoglobin": ("12.5", "g/dL")}[lab["name"]]
    assert rules({"lab_values": [{**lab, "value": plausible[0], "unit": plausible[1]}]}) == []


def test_interactions_fire_in_either_order_and_pairs_are_symmetric():
    for a, b in (("Warfarin", "Ibuprofen"), ("Ibuprofen", "Warfarin"), ("omeprazole", "Clopidogrel")):
        meds = [{"name": a, "dose": "", "route": "", "frequency": ""}, {"name": b, "dose": "", "route": "", "frequency": ""}]
        fired = flags.check({"medications": meds})
        assert [f["rule"] for f in fired] == ["drug_interaction"]
    table = flags.interaction_table()
    assert all(frozenset(reversed(sorted(pair))) in table for pair in table)
    assert rules({"medications": [{"name": "Warfarin"}, {"name": "Metformin"}]}) == []


def cli(workdir, *args, stdin=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "medvl.cli.infer", "--workdir", str(workdir), "--max-new-tokens", "16",
                           *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("weights", ["auto", "awq"])  # the profile's form (full precision), phase 4's AWQ
def test_cli_single_file(phases_1_4, weights):
    page = sorted((phases_1_4 / "datasets" / "test_images").glob("*.png"))[0]
    result = cli(phases_1_4, "--image", str(page), "--weights", weights)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    assert record["file"] == str(page) and "structured" in record and record["disclaimer"]
    assert isinstance(record["flags"], list) and record["generated_tokens"] > 0


def test_cli_gives_each_item_its_confidence_and_boxes_as_extract_does(phases_1_4, lab_page_model):
    """The CLI on the lab page with the model taught it (conftest): each lab the page shows has a
    confidence in [0, 1] and a box for its value; the lab it does not show has none and is to be
    reviewed; with source boxes off the items have confidences and no boxes."""
    page = next((phases_1_4 / "datasets" / "test_images").glob("*lab_results*.png"))
    result = cli(phases_1_4, "--image", str(page), "--model", str(lab_page_model), "--max-new-tokens", "400")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout)
    labs = [item for item in record["items"] if item["pointer"].startswith("/lab_values/")]
    assert len(labs) == len(record["structured"]["lab_values"]) >= 5
    invented = labs.pop()
    assert all(0 <= item["confidence"] <= 1 and item["boxes"]["value"] is not None for item in labs)
    assert 0 <= invented["confidence"] <= 1 and set(map(str, invented["boxes"].values())) == {"None"}
    assert invented["pointer"] in record["needs_review"]
    result = cli(phases_1_4, "--image", str(page), "--model", str(lab_page_model), "--max-new-tokens", "400",
                 "--set", "api.source_boxes=false")
    items = json.loads(result.stdout)["items"]
    assert all("boxes" not in item and item["confidence"] is not None for item in items)


def test_cli_batch_reports_the_corrupt_file_and_processes_the_rest(phases_1_4, tmp_path):
    folder = tmp_path / "scans"
    shutil.copytree(phases_1_4 / "datasets" / "test_images", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "results.jsonl"
    # (source boxes off: the pages' OCR would add seconds a page; the test above covers them)
    result = cli(phases_1_4, "--dir", str(folder), "--out", str(out), "--set", "api.source_boxes=false")
    assert result.returncode == 1
    assert "unreadable: " in result.stderr and "broken.png" in result.stderr
    assert "6 of 7 documents processed" in result.stderr  # five pages and phase 3's two-page PDF
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and all("flags" in r for r in lines)
    pdf = next(r for r in lines if r["file"].endswith(".pdf"))
    assert [p["page"] for p in pdf["pages"]] == [1, 2] and pdf["raw_text"].count("\f") == 1


def test_cli_interactive_through_stdin(phases_1_4):
    page = sorted((phases_1_4 / "datasets" / "test_images").glob("*.png"))[0]
    stdin = f"{page}\n\n{page}\nWhat is the diagnosis?\n/nonexistent.png\n\n"
    result = cli(phases_1_4, "--interactive", stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    decoder, text, records = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        record, end = decoder.raw_decode(text)
        records.append(record)
        text = text[end:].strip()
    assert len(records) == 2
    assert "structured" in records[0] and "text" in records[1]
    assert "error: /nonexistent.png" in result.stderr


def test_cli_ocr_baseline_returns_records_with_flags(phases_1_4, tmp_path):
    out = tmp_path / "ocr.jsonl"
    result = cli(phases_1_4, "--model", "ocr", "--dir", str(phases_1_4 / "datasets" / "test_images"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and all(r["parse_status"] == "ocr" and isinstance(r["flags"], list) for r in records)
    # the two-page PDF: its lab values read from page 2, its medications from page 1
    pdf = next(r for r in records if r["file"].endswith(".pdf"))
    truth = json.loads(Path(pdf["file"]).with_suffix(".json").read_text())
    page_of = {i["pointer"]: i["page"] for i in pdf["items"]}
    labs_page2 = {lab["name"] for lab in truth["pages"][1]["structured"]["lab_values"]}
    read = [(n, lab) for n, lab in enumerate(pdf["structured"]["lab_values"]) if lab["name"] in labs_page2]
    assert len(read) >= len(labs_page2) - 1 and all(page_of[f"/lab_values/{n}"] == 2 for n, _ in read)
    assert pdf["structured"]["medications"] and page_of["/medications/0"] == 1
    assert sum(len(r["structured"]["medications"]) + len(r["structured"]["lab_values"]) for r in records) > 5
    refused = cli(phases_1_4, "--model", "ocr", "--image", records[0]["file"], "--prompt", "Summarise.")
    assert refused.returncode == 1 and "--prompt needs a model" in refused.stderr


def test_cli_fhir_bundles_of_the_ocr_baseline_hold_the_pages_labs(phases_1_4, tmp_path):
    """The OCR baseline reads the real values off the pages, so its FHIR output must carry them."""
    from fhir.resources.R4B.bundle import Bundle

    out = tmp_path / "fhir.jsonl"
    result = cli(phases_1_4, "--model", "ocr", "--format", "fhir", "--dir", str(phases_1_4 / "datasets" / "test_images"),
                 "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    bundles = [Bundle.model_validate_json(line) for line in out.read_text().splitlines()]
    assert len(bundles) == 6
    observations = [e.resource for b in bundles for e in b.entry if e.resource.get_resource_type() == "Observation"]
    quantities = [o.valueQuantity for o in observations if o.valueQuantity is not None]
    assert len(quantities) >= 3 and all(q.system == "http://unitsofmeasure.org" for q in quantities if q.code)
    devices = [e.resource for b in bundles for e in b.entry if e.resource.get_resource_type() == "Device"]
    assert all("ocr" in {v.value for v in d.version} for d in devices)
    refused = cli(phases_1_4, "--format", "fhir", "--image", "x.png", "--prompt", "Summarise.")
    assert refused.returncode == 2 and "--format fhir" in refused.stderr
