"""The extraction scorer: perfect and empty answers, normalisation, hallucinations, categories."""

import pytest

from medvl.evalsuite import evaluation_documents
from medvl.scoring import Expected, aggregate, normalize, rouge_l, score


@pytest.fixture(scope="module")
def ed_note():
    doc = evaluation_documents()[0]
    return doc, Expected.from_document(doc)


def test_perfect_answer_scores_one(ed_note):
    doc, expected = ed_note
    for answer in (doc.text, doc.target_answer()):
        s = score(answer, expected)
        assert (s.term_recall, s.value_recall, s.accuracy, s.precision, s.f1) == (1.0, 1.0, 1.0, 1.0, 1.0)
        assert all(v == 1.0 for v in s.category_recall.values())


def test_empty_answer_scores_zero(ed_note):
    _, expected = ed_note
    s = score("", expected)
    assert (s.term_recall, s.value_recall, s.accuracy, s.precision, s.f1) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert s.missed["drug"] == ["Aspirin", "Atorvastatin", "Metoprolol tartrate", "Nitroglycerin"]


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


def test_normalisation_does_not_merge_different_values():
    assert normalize("7.25") != normalize("7.2")
    assert normalize("10 mg") != normalize("100 mg")
    expected = Expected(["Aspirin"], ["81 mg"], {}, "Aspirin 81 mg")
    assert score("Aspirin 810 mg", expected).value_recall == 0.0


def test_hallucinated_term_lowers_precision(ed_note):
    doc, expected = ed_note
    clean = score(doc.target_answer(), expected)
    dirty = score(doc.target_answer() + " Also Warfarin 5 mg and Sertraline 50 mg for MDD.", expected)
    assert clean.precision == 1.0 and dirty.precision < 1.0
    assert set(dirty.hallucinated) == {"Warfarin", "Sertraline", "MDD"}
    assert dirty.accuracy == clean.accuracy  # recall is untouched by extra claims


def test_partial_answer_and_category_misses(ed_note):
    _, expected = ed_note
    s = score("Aspirin 81 mg PO QD; Atorvastatin 80 mg QHS. Troponin I 0.42 ng/mL (H). NSTEMI, COPD.", expected)
    assert 0 < s.accuracy < 1
    assert s.category_recall["drug"] == 0.5 and s.category_recall["flag"] == 1.0
    assert "Metoprolol tartrate" in s.missed["drug"] and "25 mg" in s.missed["dose"]
    summary = aggregate([s, score("", expected)])
    assert summary["cases"] == 2 and summary["accuracy"] == pytest.approx(s.accuracy / 2)
    assert ("Metoprolol tartrate", 2) in summary["most_missed"]["drug"]


def test_rouge_l_scores_a_free_text_answer_through_rouge_score():
    """Longest common subsequence of word tokens: "lungs clear" is 2 of the reference's 4 tokens,
    in order: precision 1, recall 0.5, F 2/3; case and punctuation do not count."""
    reference = "The lungs are clear."
    assert rouge_l("lungs clear", reference) == pytest.approx(2 / 3)
    assert rouge_l("THE LUNGS ARE CLEAR", reference) == pytest.approx(1.0)
    assert rouge_l("no acute fracture", reference) == 0.0
    # order matters: of "clear lungs" only one word is a common subsequence with the reference
    assert rouge_l("clear lungs", reference) == pytest.approx(2 * (1 / 2) * (1 / 4) / (1 / 2 + 1 / 4))
