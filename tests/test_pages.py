"""PDF input: pages rendered in memory with their limits, refusals that name the problem, and the
merge of a document's page records with each item's page."""

import io

import pypdf
import pytest
from PIL import Image

from medvl.core.settings import ApiSettings, SettingsError, load_settings
from medvl.engine.images import BadInput
from medvl.engine.pages import PageLimits, decode_pages, headed_page_texts
from medvl.medical.documents import document_pdf, packet_documents, pdf_ground_truth, render_document
from medvl.medical.records import document_result, json_pointer, merge_pages, resolve_pointer

LIMITS = PageLimits.from_settings(ApiSettings())


def blank_pdf(pages: int, size: tuple[int, int] = (100, 130), resolution: float = 72.0) -> bytes:
    image = Image.new("RGB", size, "white")
    buffer = io.BytesIO()
    image.save(buffer, format="PDF", save_all=True, append_images=[image] * (pages - 1), resolution=resolution)
    return buffer.getvalue()


def encrypted(data: bytes, user_password: str) -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt(user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def refusal(data: bytes, limits: PageLimits = LIMITS) -> BadInput:
    with pytest.raises(BadInput) as caught:
        decode_pages(data, limits)
    return caught.value


def test_a_two_page_pdf_renders_both_pages_as_the_images_it_was_made_of():
    docs = packet_documents(1234)
    data = document_pdf(docs)
    assert data == document_pdf(docs)  # deterministic bytes: phase 3 keeps an unchanged file
    pages = decode_pages(data, LIMITS)
    assert len(pages) == 2 and all(page.mode == "RGB" for page in pages)
    for page, doc in zip(pages, docs, strict=True):
        original = render_document(doc)
        # written at 150 dpi, read back at api.pdf_render_dpi = 150: the same pixels, +-1 rounding
        assert abs(page.size[0] - original.size[0]) <= 1 and abs(page.size[1] - original.size[1]) <= 1
        # the page's ink is where the original's is (not a blank render): compare dark-pixel counts
        dark = sum(1 for v in page.convert("L").getdata() if v < 128)
        dark_original = sum(1 for v in original.convert("L").getdata() if v < 128)
        assert dark == pytest.approx(dark_original, rel=0.15)
    assert abs(decode_pages(data, PageLimits(LIMITS.max_bytes, LIMITS.max_pixels, 2, 75))[0].size[0] - 500) <= 1


def test_an_image_is_one_page_and_keeps_the_image_checks():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buffer, format="PNG")
    assert [p.size for p in decode_pages(buffer.getvalue(), LIMITS)] == [(64, 48)]
    assert refusal(b"").code == "empty_file"
    assert refusal(b"\x89PNG\r\n\x1a\n not really").code == "bad_image"


def test_encrypted_truncated_corrupt_and_over_long_pdfs_are_refused_by_name():
    data = blank_pdf(2)
    locked = refusal(encrypted(data, "secret"))
    assert (locked.status, locked.code) == (400, "encrypted_pdf") and "password" in str(locked)
    # encrypted only against editing (empty user password): opens as any viewer opens it
    assert len(decode_pages(encrypted(data, ""), LIMITS)) == 2
    cut = refusal(data[: len(data) // 2])
    assert (cut.status, cut.code) == (400, "truncated_pdf") and "truncated" in str(cut)
    corrupt = refusal(b"%PDF-1.4\nthis is no PDF body\n%%EOF\n")
    assert (corrupt.status, corrupt.code) == (400, "bad_pdf") and "not a readable PDF" in str(corrupt)
    long = refusal(blank_pdf(3), PageLimits(LIMITS.max_bytes, LIMITS.max_pixels, 2, 150))
    assert (long.status, long.code) == (400, "too_many_pages") and "3 pages; the limit is 2" in str(long)
    big = refusal(data, PageLimits(len(data) - 1, LIMITS.max_pixels, 20, 150))
    assert (big.status, big.code) == (413, "file_too_large")


def test_a_poster_sized_page_is_rendered_within_the_pixel_limit():
    # 100x130 pixels placed at 1 dpi: a 100x130-inch page, 15000x19500 pixels at 150 dpi
    poster = blank_pdf(1, resolution=1.0)
    limits = PageLimits(LIMITS.max_bytes, 1_000_000, 20, 150)
    (page,) = decode_pages(poster, limits)
    assert page.size[0] * page.size[1] <= 1_000_000 and page.size[0] > 800


def test_pdf_settings_are_validated():
    with pytest.raises(SettingsError) as caught:
        load_settings("tiny", ["api.max_pdf_pages=0", "api.pdf_render_dpi=5000"])
    assert "api.max_pdf_pages" in str(caught.value) and "api.pdf_render_dpi" in str(caught.value)


def test_merge_keeps_every_distinct_item_with_its_page_and_names_conflicting_vitals():
    lab = {"name": "Creatinine", "value": "1.9", "unit": "mg/dL", "flag": "H", "reference_range": ""}
    later = {**lab, "value": "1.4", "flag": ""}
    page1 = {"medications": [], "diagnoses": ["HTN"], "procedures": [], "lab_values": [lab],
             "vitals": {"heart_rate": "88 bpm"}}
    page2 = {"medications": [], "diagnoses": ["HTN", "CKD 3b"], "procedures": [], "lab_values": [lab, later],
             "vitals": {"heart_rate": "96 bpm", "spo2/fio2": "94%"}}
    record, items, conflicts = merge_pages([page1, page2])
    assert record["diagnoses"] == ["HTN", "CKD 3b"]  # the repeated one kept once
    assert record["lab_values"] == [lab, later]  # a serial reading is a distinct item
    assert record["vitals"] == {"heart_rate": "88 bpm", "spo2/fio2": "94%"}
    pages = {item["pointer"]: item["page"] for item in items}
    assert pages == {"/diagnoses/0": 1, "/lab_values/0": 1, "/vitals/heart_rate": 1, "/diagnoses/1": 2,
                     "/lab_values/1": 2, "/vitals/spo2~1fio2": 2}
    # every pointer names an item of the record, and every item has exactly one pointer
    assert [resolve_pointer(record, pointer) for pointer in pages] == [
        "HTN", lab, "88 bpm", "CKD 3b", later, "94%"]
    assert len(items) == 2 + 2 + 2 and json_pointer("vitals", "a/b~c") == "/vitals/a~1b~0c"
    assert [(c["rule"], c["item"], c["value"]) for c in conflicts] == [
        ("vital_differs_between_pages", "heart_rate", "96 bpm")]
    assert "page 1's 88 bpm" in conflicts[0]["reason"]


def test_document_result_flags_the_whole_record_and_takes_the_worst_parse_status():
    empty = {"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}}
    warfarin = {**empty, "medications": [{"name": "Warfarin", "dose": "5 mg", "route": "PO", "frequency": "QD"}]}
    aspirin = {**empty, "medications": [{"name": "Aspirin", "dose": "81 mg", "route": "PO", "frequency": "QD"}]}
    result = document_result([{"structured": warfarin, "parse_status": "json"},
                              {"structured": aspirin, "parse_status": "repaired"}])
    assert result["parse_status"] == "repaired"
    # the two drugs interact although they sit on different pages
    assert any(f["rule"] == "drug_interaction" for f in result["flags"])
    assert [i["page"] for i in result["items"]] == [1, 2]
    alone = document_result([{"structured": warfarin, "parse_status": "json"}])
    assert not any(f["rule"] == "drug_interaction" for f in alone["flags"])


def test_the_pdf_truth_is_its_pages_truths_merged_with_pages():
    docs = packet_documents(1234)
    truth = pdf_ground_truth("packet", docs)
    assert [p["kind"] for p in truth["pages"]] == ["discharge_summary", "lab_results"]
    assert truth["structured"]["lab_values"][-len(docs[1].lab_values):] == docs[1].lab_values
    assert {i["page"] for i in truth["items"]} == {1, 2}


def test_page_texts_are_headed_only_when_there_are_several():
    assert headed_page_texts(["one"]) == "one"
    assert headed_page_texts(["a", "b"]) == "Page 1:\na\n\nPage 2:\nb"
