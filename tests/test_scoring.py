"""The extraction scorer: records matched item by item, and the answers that must score low.

A metric is only as good as what it refuses: besides the right answer, every figure here is
tested with answers that must score low (empty, generic, the right words in the wrong places).
"""

import json

import pytest

from medvl.evaluation.scoring import (
    Case,
    compare,
    normalize,
    record_figures,
    rouge_l,
    score_answers,
    score_record,
    verdict,
)
from medvl.medical.records import empty_structured
from medvl.medical.suite import evaluation_documents


@pytest.fixture(scope="module")
def suite():
    return evaluation_documents()


def figures(answer: str, reference: dict, item_type: str | None = None) -> dict[str, float]:
    s = score_record(answer, reference)
    return record_figures(s.counts[item_type] if item_type else s.totals())


def test_the_reference_record_scores_one_and_empty_or_generic_answers_zero(suite):
    for doc in suite:
        reference = doc.structured()
        assert figures(doc.target_answer(), reference) == {"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                           "name_recall": 1.0}
        for answer in ("", "{}", "ok", json.dumps(empty_structured()), "The patient has a medical condition."):
            assert max(figures(answer, reference).values()) == 0.0, (doc.doc_id, answer)


def test_the_page_text_is_not_a_record(suite):
    """The old scorer gave the page's own text (every word present) full marks; read as a record,
    the lexicon fallback recovers drug names, doses and conditions but no route or frequency, so
    no medication is right and the overall F1 stays low."""
    doc = suite[0]
    s = score_record(doc.text, doc.structured())
    assert s.parse_status == "fallback" and record_figures(s.totals())["f1"] < 0.5
    assert record_figures(s.counts["medications"])["f1"] == 0.0


def test_doses_moved_to_the_wrong_drug_are_wrong(suite):
    """Rotating doses and frequencies among a document's drugs keeps every name (name recall 1.0)
    and makes the medications wrong (F1 below 0.5): the most dangerous error scores low."""
    checked = 0
    for doc in suite:
        meds = doc.structured()["medications"]
        if len(meds) < 2:
            continue
        rotated = [{**m, "dose": meds[(i + 1) % len(meds)]["dose"], "frequency": meds[(i + 1) % len(meds)]["frequency"]}
                   for i, m in enumerate(meds)]
        answer = json.dumps({**doc.structured(), "medications": rotated})
        f = figures(answer, doc.structured(), "medications")
        assert f["f1"] < 0.5 and f["name_recall"] == 1.0, doc.doc_id
        checked += 1
    assert checked == 4


def test_a_lab_value_given_to_the_wrong_analyte_or_flag_is_wrong(suite):
    bmp = next(d for d in suite if d.doc_id == "eval-lab-bmp-cbc")
    labs = bmp.structured()["lab_values"]
    swapped = [dict(lab) for lab in labs]
    swapped[0]["value"], swapped[1]["value"] = labs[1]["value"], labs[0]["value"]
    swapped[2]["flag"] = "L"
    f = figures(json.dumps({**bmp.structured(), "lab_values": swapped}), bmp.structured(), "lab_values")
    assert f["recall"] == pytest.approx(5 / 8) and f["name_recall"] == 1.0


def test_an_invented_item_lowers_precision_not_recall(suite):
    doc = suite[0]
    invented = {**doc.structured(), "lab_values": [*doc.structured()["lab_values"],
                                                   {"name": "Potassium", "value": "6.1", "unit": "mmol/L",
                                                    "flag": "H", "reference_range": ""}]}
    f = figures(json.dumps(invented), doc.structured())
    assert f["recall"] == 1.0 and f["precision"] < 1.0
    assert score_record(json.dumps(invented), doc.structured()).invented == ["lab_values: Potassium 6.1 mmol/L H"]


@pytest.mark.parametrize(("answer", "item"), [
    ("ASPIRIN 81MG", "Aspirin 81 mg"),
    ("aspirin   81 mg", "Aspirin 81 mg"),
    ("K 7.20", "K 7.2"),
    ("Sodium 131.0 mmol/L", "Sodium 131 mmol/L"),
    ("ref 3.5\u20135.1", "ref 3.5-5.1"),
    ("BP 142/91 MMHG", "BP 142/91 mmHg"),
])
def test_normalisation_a_clinician_would_accept(answer, item):
    assert normalize(answer) == normalize(item)


def test_clinical_equivalents_match_and_different_values_do_not():
    reference = {"medications": [{"name": "Aspirin", "dose": "81 mg", "route": "PO", "frequency": "QD"}],
                 "diagnoses": ["DM2"], "procedures": [], "vitals": {"heart_rate": "88 bpm"},
                 "lab_values": [{"name": "Potassium", "value": "5.9", "unit": "mmol/L", "flag": "H",
                                 "reference_range": ""}]}
    same = {"medications": [{"name": "ASPIRIN", "dose": "81mg", "route": "po", "frequency": "qd"}],
            "diagnoses": ["Type 2 diabetes mellitus"], "procedures": [], "vitals": {"Heart rate": "88 BPM"},
            "lab_values": [{"name": "potassium", "value": "5.90", "unit": "mmol/l", "flag": "high"}]}
    assert figures(json.dumps(same), reference)["f1"] == 1.0
    wrong = json.loads(json.dumps(same))
    wrong["medications"][0]["dose"] = "810 mg"
    wrong["lab_values"][0]["value"] = "5.95"
    assert figures(json.dumps(wrong), reference)["f1"] == 0.5  # 2 of 4 items right either way


def test_a_drug_listed_twice_pairs_its_right_line():
    reference = {**empty_structured(), "medications": [{"name": "Aspirin", "dose": "81 mg", "route": "PO",
                                                        "frequency": "QD"}]}
    answer = {**empty_structured(), "medications": [
        {"name": "Aspirin", "dose": "325 mg", "route": "PO", "frequency": "once"},
        {"name": "Aspirin", "dose": "81 mg", "route": "PO", "frequency": "QD"}]}
    assert figures(json.dumps(answer), reference) == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                                      "name_recall": 1.0}


def test_a_non_json_answer_earns_what_the_repair_recovers_and_says_so(suite):
    doc = suite[2]
    cut = doc.target_answer()[:-200]  # cut inside the fifth drug's dose
    s = score_record(cut, doc.structured())
    assert s.parse_status == "repaired" and record_figures(s.totals())["recall"] == pytest.approx(4 / 8)


def test_free_text_is_scored_with_rouge_l_only_and_never_enters_extraction(suite):
    """A caption row with no medical term in it once gave "ok" full marks on every figure."""
    doc = suite[0]
    cases = [Case("roco-1", "test", "roco", "a.png", "Describe the image.", "The lungs are clear."),
             Case(doc.doc_id, "test", "suite", "b.png", "Extract.", doc.structured())]
    right = score_answers(cases, {"roco-1": "The lungs are clear.", doc.doc_id: doc.target_answer()})
    generic = score_answers(cases, {"roco-1": "ok", doc.doc_id: "ok"})
    test = generic["subsets"]["test"]
    assert test["extraction"]["cases"] == 1 and test["free_text"]["cases"] == 1
    assert test["extraction"]["f1"]["value"] == 0.0 and test["free_text"]["rouge_l"]["value"] == 0.0
    assert right["subsets"]["test"]["free_text"]["rouge_l"]["value"] == 1.0
    assert right["sources"]["roco"]["extraction"] == {"cases": 0}
    assert set(right["sources"]) == {"roco", "suite"}


def test_rouge_l_scores_a_free_text_answer_through_rouge_score():
    reference = "The lungs are clear."
    assert rouge_l("lungs clear", reference) == pytest.approx(2 / 3)
    assert rouge_l("THE LUNGS ARE CLEAR", reference) == pytest.approx(1.0)
    assert rouge_l("no acute fracture", reference) == 0.0
    assert rouge_l("clear lungs", reference) == pytest.approx(2 * (1 / 2) * (1 / 4) / (1 / 2 + 1 / 4))


def test_intervals_and_verdicts_come_from_the_bootstrap(suite):
    """Five cases cannot tell "all right" from "three of five right" (a resample of the three
    alone happens 8% of the time): no significant difference. Twenty cases can."""
    five = [Case(d.doc_id, "suite", "suite", "x.png", "Extract.", d.structured()) for d in suite]
    all_five = score_answers(five, {d.doc_id: d.target_answer() for d in suite})
    three = score_answers(five, {d.doc_id: d.target_answer() for d in suite[::2]})
    assert compare(all_five, three)["subsets"]["suite"]["extraction_f1"]["verdict"] == "no significant difference"
    docs = suite * 4
    cases = [Case(f"{d.doc_id}-{i}", "suite", "suite", "x.png", "Extract.", d.structured()) for i, d in enumerate(docs)]
    right = score_answers(cases, {c.case_id: d.target_answer() for c, d in zip(cases, docs, strict=True)})
    half = score_answers(cases, {c.case_id: d.target_answer() for c, d in list(zip(cases, docs, strict=True))[::2]})
    f1 = half["subsets"]["suite"]["extraction"]["f1"]
    assert 0 < f1["ci95"][0] < f1["value"] < f1["ci95"][1] <= 1
    assert half["unanswered"] == 10
    assert compare(right, half)["subsets"]["suite"]["extraction_f1"]["verdict"] == "better"
    assert compare(half, right)["subsets"]["suite"]["extraction_f1"]["verdict"] == "worse"
    same = compare(right, right)["subsets"]["suite"]["extraction_f1"]
    assert same["difference"] == 0 and same["verdict"] == "no significant difference"
    assert verdict([-0.1, 0.2]) == "no significant difference" and verdict([0.01, 0.2]) == "better"
    again = score_answers(cases, {c.case_id: d.target_answer() for c, d in zip(cases, docs, strict=True)})
    assert again == right  # seeded: reproducible


def test_medvl_score_compares_two_models_on_the_cases_it_is_asked_about(tmp_path, capsys):
    """--against gives the paired difference with its interval; --cases-matching keeps the cases
    whose id matches: answers right on every page against answers empty on the lab reports only
    are better on the lab reports (an interval above zero) and the same elsewhere (0 exactly)."""
    import json

    from medvl.cli.score import main
    from medvl.medical.documents import generate_document

    docs = [generate_document(seed, prefix="syn") for seed in range(40)]
    cases = [{"case_id": f"syn-{doc.kind}-{i}", "subset": "test", "source": "synthetic", "image": "x.png",
              "prompt": "Extract.", "reference": doc.structured()} for i, doc in enumerate(docs)]
    labs = [c for c in cases if "lab_results" in c["case_id"]]
    assert 3 <= len(labs) < len(cases)
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))

    def answers(name: str, empty_labs: bool) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"case_id": c["case_id"], "answer": "{}" if empty_labs and c in labs
                                            else json.dumps(c["reference"])}) + "\n" for c in cases))
        return str(path)

    right, worse = answers("right.jsonl", False), answers("worse.jsonl", True)
    out = tmp_path / "labs.json"
    assert main(["--cases", str(tmp_path / "cases.jsonl"), "--answers", right, "--against", worse,
                 "--cases-matching", "lab_results", "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["cases"] == len(labs) and scored["cases_matching"] == "lab_results"
    diff = scored["against"]["subsets"]["test"]["extraction_f1"]
    assert diff["difference"] > 0.9 and diff["ci95"][0] > 0 and diff["verdict"] == "better"
    assert "F1 +" in capsys.readouterr().out
    assert main(["--cases", str(tmp_path / "cases.jsonl"), "--answers", right, "--against", worse,
                 "--cases-matching", "^(?!.*lab_results)", "--out", str(out)]) == 0
    others = json.loads(out.read_text())["against"]["subsets"]["test"]["extraction_f1"]
    assert others["difference"] == 0 and others["ci95"] == [0.0, 0.0]
    assert main(["--cases", str(tmp_path / "cases.jsonl"), "--answers", right, "--cases-matching", "nothing"]) == 2
