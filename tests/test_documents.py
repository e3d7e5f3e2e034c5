"""The synthetic document generator: deterministic, realistic, and its ground truth is drawn."""

import hashlib
import io

from PIL import Image, ImageChops, ImageDraw

from medvl.medical.documents import (
    KINDS,
    LINE_HEIGHT,
    MARGIN,
    PAGE_WIDTH,
    benchmark_documents,
    body_font,
    generate_document,
    line_positions,
    render_document,
)


def png_digest(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def test_same_seed_same_document_and_pixels():
    a, b = generate_document(99), generate_document(99)
    assert a.text == b.text and a.structured() == b.structured()
    assert png_digest(render_document(a)) == png_digest(render_document(b))
    assert generate_document(100).text != a.text


def test_benchmark_set_covers_all_five_kinds():
    docs = benchmark_documents(1234, 5)
    assert [d.kind for d in docs] == list(KINDS)
    assert len({d.doc_id for d in docs}) == 5


def test_documents_use_clinical_abbreviations_and_values():
    text = "\n".join(generate_document(seed).text for seed in range(60))
    for abbreviation in ("BID", "QD", "PRN", "TID", "COPD", "DM2", "mmHg", "SpO2"):
        assert abbreviation in text, abbreviation
    labs = generate_document(5, "lab_results")
    assert labs.lab_values and all(lab["unit"] and lab["reference_range"] for lab in labs.lab_values)
    assert any(lab["flag"] in ("H", "L") for seed in range(20)
               for lab in generate_document(seed, "lab_results").lab_values)


def test_every_ground_truth_item_is_on_a_drawn_line():
    """Each expected term/value sits in a body line, and that line's pixels on the page are
    exactly the pixels of the line drawn alone at the same place (render and compare)."""
    for doc in benchmark_documents(1234, 5):
        page = render_document(doc)
        font = body_font(doc)
        positions = line_positions(doc)
        for item in doc.expected_terms + doc.expected_values:
            hits = [(y, line) for y, line in positions if item in line]
            assert hits, f"{doc.doc_id}: {item!r} is not on any line"
            y, line = hits[0]
            alone = Image.new("RGB", page.size, "white")
            ImageDraw.Draw(alone).text((MARGIN, y), line, font=font, fill=(15, 15, 15))
            box = (0, y - 4, PAGE_WIDTH, y + LINE_HEIGHT - 4)
            crop_page, crop_alone = page.crop(box), alone.crop(box)
            assert ImageChops.difference(crop_page, crop_alone).getbbox() is None, (doc.doc_id, item)
            assert crop_alone.convert("L").getextrema()[0] < 100  # the line really has ink


def unsupported_items(record: dict, page_text: str) -> list[str]:
    """The items of ``record`` the page does not print: a medication's or a lab's fields must all
    sit on one line of the page (a flag, a reference range only where printed), a vital's value,
    a diagnosis and a procedure must appear in the text."""
    from medvl.evaluation.scoring import contains, normalize

    lines = [normalize(line) for line in page_text.splitlines()]
    text = normalize(page_text)
    problems = []
    for key, fields in (("medications", ("name", "dose", "route", "frequency")),
                        ("lab_values", ("name", "value", "unit", "flag", "reference_range"))):
        for item in record[key]:
            wanted = [item[f] for f in fields if item[f]]
            if not any(all(contains(line, w) for w in wanted) for line in lines):
                problems.append(f"{key}: {wanted}")
    problems += [f"vital {k}: {v}" for k, v in record["vitals"].items() if not contains(text, v)]
    problems += [f"{key}: {name}" for key in ("diagnoses", "procedures") for name in record[key]
                 if not contains(text, name)]
    return problems


def test_every_target_value_is_printed_on_its_page():
    """Training on targets that state what a page does not print teaches invention (a discharge
    summary's lab once carried a flag and a reference range the page did not show; a radiology
    report's indication became a diagnosis). 200 documents of every kind: each target item is on
    its page, and the page's lab lines carry the flag the target says."""
    from medvl.medical.suite import evaluation_documents

    for kind in KINDS:
        for seed in range(200):
            doc = generate_document(seed, kind)
            assert not unsupported_items(doc.structured(), doc.text), (doc.doc_id, unsupported_items(
                doc.structured(), doc.text))
    for doc in evaluation_documents():
        assert not unsupported_items(doc.structured(), doc.text), (doc.doc_id, unsupported_items(
            doc.structured(), doc.text))
    radiology = generate_document(3, "radiology_report")
    indication = next(line for line in radiology.lines if line.startswith("Indication:"))
    assert not any(d in indication for d in radiology.diagnoses)


def test_the_support_check_refuses_what_a_page_does_not_print():
    doc = generate_document(7, "discharge_summary")
    record = doc.structured()
    record["lab_values"] = [{**record["lab_values"][0], "reference_range": "70-99"}]
    record["diagnoses"] = [*record["diagnoses"], "Atrial fibrillation"]
    assert len(unsupported_items(record, doc.text)) == 2
