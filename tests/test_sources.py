"""Source boxes (medvl/medical/sources.py): each field's box from the page's OCR, checked against
where the document generator drew it; a value the page does not show gets none and is reviewed."""

import pytest

from medvl.medical.documents import benchmark_documents, render_document
from medvl.medical.records import document_result
from medvl.medical.sources import item_boxes, locate, page_runs

from conftest import drawn_box

TOLERANCE_PX = 8


@pytest.fixture(scope="module")
def lab_page():
    doc = next(d for d in benchmark_documents(1234, 5) if d.kind == "lab_results")
    image = render_document(doc)
    return doc, image, page_runs(image)


def test_each_lab_field_gets_the_box_the_generator_drew_it_in(lab_page):
    """Every lab's name, value, unit and flag: the box found covers the drawn text (within 8 px),
    on its own row (a value such as 4.4 also appears in another row's range)."""
    doc, image, runs = lab_page
    width, height = image.size
    labs = doc.structured()["lab_values"]
    assert len(labs) >= 4
    for lab in labs:
        near = locate(lab["name"], runs)
        for field in ("name", "value", "unit", "flag"):
            if not lab[field]:
                continue
            found = locate(lab[field], runs, None if field == "name" else near)
            x0, y0, x1, y1 = drawn_box(doc, lab["name"], lab[field], from_right=field == "flag")
            assert found is not None, (lab, field)
            fx0, fy0, fx1, fy1 = found[0] * width, found[1] * height, found[2] * width, found[3] * height
            assert fx0 <= x0 + TOLERANCE_PX and fx1 >= x1 - TOLERANCE_PX, (lab, field, found)
            assert abs(fx0 - x0) < 3 * TOLERANCE_PX and abs(fx1 - x1) < 3 * TOLERANCE_PX, (lab, field, found)
            assert y0 - TOLERANCE_PX <= (fy0 + fy1) / 2 <= y1 + TOLERANCE_PX, (lab, field, found)


def test_a_value_the_page_does_not_show_gets_no_box_and_is_reviewed(lab_page):
    """A lab read right and a medication the page never shows (an invention): the lab's fields all
    have boxes; the drug gets none, and the item joins needs_review after the unsure ones."""
    doc, _, runs = lab_page
    lab = {**doc.structured()["lab_values"][0], "flag": "", "reference_range": ""}  # (PP-OCR misses some ranges)
    record = {"medications": [{"name": "Warfarin", "dose": "5 mg", "route": "", "frequency": ""}],
              "diagnoses": [], "procedures": [], "lab_values": [lab], "vitals": {}}
    document = document_result([{"structured": record, "parse_status": "json"}])
    document["needs_review"] = []
    item_boxes(document, [runs])
    items = {item["pointer"]: item for item in document["items"]}
    assert items["/medications/0"]["boxes"] == {"name": None, "dose": None}
    assert all(box is not None for box in items["/lab_values/0"]["boxes"].values())
    assert document["needs_review"] == ["/medications/0"]
    assert locate("", runs) is None and locate("Metformin 500 mg", []) is None
