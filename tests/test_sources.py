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


# --------------------------------------------------------------------------- one reading per page

PAGE_INCHES = (8.5, 11)
LINE_TOP, LINE_STEP, LINE_X, FONT_PT = 0.9, 0.04, 0.1, 11


def born_digital_pdf(lines: list[str]) -> bytes:
    """A Letter page whose lines are real PDF text (TrueType glyphs), each line's top at
    ``LINE_TOP - i * LINE_STEP`` of the page height, from ``LINE_X`` of its width."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=PAGE_INCHES)
    for i, line in enumerate(lines):
        figure.text(LINE_X, LINE_TOP - i * LINE_STEP, line, fontsize=FONT_PT, va="top", family="DejaVu Sans")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}):
        figure.savefig(buffer, format="pdf")
    return buffer.getvalue()


def test_a_born_digital_pdf_gives_its_own_text_and_boxes_and_no_ocr_runs(monkeypatch):
    """A PDF page with a text layer: its lines and their boxes come from the PDF (OCR made to
    fail if called), each line's box where it was drawn (within 8 px), each value found on its
    own line."""
    from medvl.core.settings import ApiSettings
    from medvl.engine.pages import PageLimits, decode_pages
    from medvl.medical import ocr

    lines = ["Patient: Maria Novak MRN: 5389280", "Hemoglobin 9.1 g/dL L (12.0-16.0)",
             "- Metformin 500 mg PO BID", "BP 142/88 mmHg HR 96 bpm"]
    limits = PageLimits.from_settings(ApiSettings())
    (page,) = decode_pages(born_digital_pdf(lines), limits)
    monkeypatch.setattr(ocr, "read_boxes", lambda image: pytest.fail("OCR ran on a page that has its own text"))
    assert ocr.read_lines(page) == lines
    assert ocr.grounded_prompt(page, "List the labs.").count("Hemoglobin 9.1 g/dL") == 1
    runs = page_runs(page)
    width, height = page.size
    line_px = FONT_PT / 72 * limits.dpi
    for i, line in enumerate(lines):
        box = locate(line, runs)
        assert box is not None, line
        top = (1 - (LINE_TOP - i * LINE_STEP)) * height
        assert abs(box[0] * width - LINE_X * width) <= TOLERANCE_PX, (line, box)
        assert top - TOLERANCE_PX <= box[1] * height and box[3] * height <= top + line_px + TOLERANCE_PX, (line, box)
    value, name = locate("9.1", runs), locate("Hemoglobin", runs)
    assert abs(value[1] - name[1]) * height < 2 and value[0] > name[2]
    # A resized copy carries PIL's info but not a reading: its boxes would not fit it.
    monkeypatch.setattr(ocr, "read_boxes", lambda image: [])
    assert ocr.page_runs(page.resize((width // 2, height // 2))) == []


def test_a_scanned_page_is_read_by_ocr_once_for_the_prompt_and_the_boxes(monkeypatch):
    """An image-only PDF (a scan) has no text layer: OCR reads it, once, and the grounded prompt
    and the source boxes share that reading."""
    import io

    from medvl.core.settings import ApiSettings
    from medvl.engine.pages import PageLimits, decode_pages
    from medvl.medical import ocr

    doc = next(d for d in benchmark_documents(1234, 5) if d.kind == "lab_results")
    buffer = io.BytesIO()
    render_document(doc).save(buffer, format="PDF", resolution=150)
    (page,) = decode_pages(buffer.getvalue(), PageLimits.from_settings(ApiSettings()))
    assert ocr.TEXT_RUNS not in page.info
    calls = []
    read = ocr.read_boxes
    monkeypatch.setattr(ocr, "read_boxes", lambda image: calls.append(image) or read(image))
    prompt = ocr.grounded_prompt(page, "List the labs.")
    runs = page_runs(page)
    assert len(calls) == 1
    lab = doc.structured()["lab_values"][0]
    assert lab["name"] in prompt.replace(" ", "") or lab["name"] in prompt
    assert locate(lab["name"], runs) is not None
