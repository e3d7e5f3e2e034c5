"""Per-field confidences (medvl/medical/confidence.py): the joint probability of a value's tokens,
placed by character spans in the JSON answer, carried to the merged record of a document."""

import math

import pytest

from medvl.medical.confidence import document_confidences, field_confidences, needs_review, value_spans
from medvl.medical.records import document_result

ANSWER = ('{"medications": [{"name": "Metformin", "dose": "500 mg", "route": "", "frequency": "BID"}], '
          '"diagnoses": ["T2 \\"DM\\""], "procedures": [], "lab_values": [], "vitals": {"a/b": "120/80"}}')


def tokens_of(text: str, unsure: dict[str, float] | None = None) -> list[tuple[bytes, float]]:
    """``text`` cut into tokens of up to 3 characters (a multi-byte character stays whole), each
    sure (log-probability -0.01) unless its text is in ``unsure``."""
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
    return [(p.encode(), math.log((unsure or {}).get(p, math.exp(-0.01)))) for p in pieces]


def test_value_spans_find_every_scalar_by_pointer():
    spans = {pointer: ANSWER[a:b] for pointer, a, b in value_spans(ANSWER)}
    assert spans == {"/medications/0/name": "Metformin", "/medications/0/dose": "500 mg", "/medications/0/route": "",
                     "/medications/0/frequency": "BID", "/diagnoses/0": 'T2 \\"DM\\"', "/vitals/a~1b": "120/80"}
    assert value_spans('{"a": [1, 2') == [] and value_spans("no json") == []


def test_a_value_is_as_sure_as_the_product_of_its_tokens():
    """Sure tokens everywhere: ~1. Two 70%-sure tokens inside the dose: the dose alone drops to
    ~0.49 (the product: the minimum would say 0.70), the name stays ~0.96; an empty value gets none."""
    sure = field_confidences(ANSWER, tokens_of(ANSWER))
    assert all(c > 0.9 for c in sure.values()) and "/medications/0/route" not in sure
    dose = ANSWER.index("500 mg")
    pieces = [ANSWER[i:i + 3] for i in range(0, len(ANSWER), 3)]
    inside = [p for i, p in zip(range(0, len(ANSWER), 3), pieces, strict=True) if dose <= i < dose + 6]
    assert len(inside) == 2
    unsure = field_confidences(ANSWER, tokens_of(ANSWER, {p: 0.7 for p in inside}))
    assert unsure["/medications/0/dose"] == pytest.approx(0.7 * 0.7 * math.exp(-0.01), rel=0.05)
    assert unsure["/medications/0/name"] == pytest.approx(sure["/medications/0/name"])


def test_tokens_that_do_not_make_the_answer_give_no_confidences():
    """Log-probabilities of another answer (or with a token missing) would be misplaced: none."""
    assert field_confidences(ANSWER, tokens_of(ANSWER)[1:]) == {}
    assert field_confidences(ANSWER, tokens_of(ANSWER.replace("500", "250"))) == {}


def test_a_document_scores_each_item_on_its_own_page_and_lists_the_unsure_first():
    """Page 2 repeats page 1's medication (kept once, scored on page 1) and adds a lab value
    whose value is unsure; needs_review lists it first, then an item with no confidence."""
    med = {"name": "Metformin", "dose": "500 mg", "route": "oral", "frequency": "BID"}
    lab = {"name": "Creatinine", "value": "1.9", "unit": "mg/dL", "flag": "H", "reference_range": ""}
    empty = {"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}}
    pages = [{"structured": {**empty, "medications": [med], "diagnoses": ["HTN"]}, "parse_status": "json",
              "confidence": {"/medications/0/name": 0.99, "/medications/0/dose": 0.95}},
             {"structured": {**empty, "medications": [med], "lab_values": [lab]}, "parse_status": "json",
              "confidence": {"/medications/0/name": 0.2, "/lab_values/0/name": 0.9, "/lab_values/0/value": 0.3}}]
    document = document_confidences(document_result(pages), pages, below=0.5)
    items = {item["pointer"]: item for item in document["items"]}
    assert items["/medications/0"]["page"] == 1 and items["/medications/0"]["confidence"] == 0.95
    assert items["/medications/0"]["fields"] == {"name": 0.99, "dose": 0.95}
    assert items["/lab_values/0"]["confidence"] == 0.3 and items["/diagnoses/0"]["confidence"] is None
    assert document["needs_review"] == ["/diagnoses/0", "/lab_values/0"]
    assert needs_review(document["items"], below=0.0) == ["/diagnoses/0"]


def test_the_scorers_verdict_per_item_refuses_wrong_fields_and_inventions():
    """The right record: every item right. A wrong dose, a lab the page lacks, an empty answer:
    wrong, wrong, nothing to judge."""
    from medvl.evaluation.scoring import item_verdicts

    truth = {"medications": [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"}],
             "diagnoses": ["Hypertension"], "procedures": [], "vitals": {"heart_rate": "88 bpm"},
             "lab_values": [{"name": "Creatinine", "value": "1.9", "unit": "mg/dL", "flag": "H", "reference_range": ""}]}
    assert item_verdicts(truth, truth) == {"/medications/0": True, "/diagnoses/0": True, "/vitals/heart_rate": True,
                                           "/lab_values/0": True}
    wrong = {**truth, "medications": [{**truth["medications"][0], "dose": "850 mg"}],
             "lab_values": [*truth["lab_values"], {"name": "Troponin I", "value": "0.4", "unit": "ng/mL", "flag": "H"}]}
    verdicts = item_verdicts(wrong, truth)
    assert verdicts["/medications/0"] is False and verdicts["/lab_values/1"] is False and verdicts["/lab_values/0"]
    assert item_verdicts({"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}},
                         truth) == {}


def test_calibration_tells_calibrated_confidences_from_overconfident_ones():
    """Items right as often as their confidence says: a small calibration error. The same
    confidences on items that are all wrong: a large one, and no accuracy above the threshold."""
    from medvl.medical.confidence import calibration

    calibrated = [(0.9, i < 9) for i in range(10)] + [(0.3, i < 3) for i in range(10)]
    good = calibration(calibrated, threshold=0.5)
    assert good["expected_calibration_error"] == pytest.approx(0.0)
    assert good["above"] == {"items": 10, "accuracy": 0.9} and good["below"] == {"items": 10, "accuracy": 0.3}
    bad = calibration([(c, False) for c, _ in calibrated], threshold=0.5)
    assert bad["expected_calibration_error"] == pytest.approx(0.6) and bad["above"]["accuracy"] == 0.0
    assert calibration([], 0.5)["expected_calibration_error"] is None
