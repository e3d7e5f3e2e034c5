"""The reviewer's routes on the real server (the OCR + rules baseline reading phase 3's lab page,
so the filed record has real values and boxes): file, list, show, correct, refuse a stale or
malformed save, export; the audit lines name pointers and never a value; no key, no start."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from medvl.http.validate import running_server

from conftest import REPO

KEY = "x9b0mO0Jp0H1o5l8yM2fS0tqH2xY6bXHk3r1Yl5m4bA="
API_KEY = "review-test-key"
HEADERS = {"X-API-Key": API_KEY}
CORRECTED = "7.77"  # a lab value no page of the run shows


@pytest.fixture(scope="module")
def review_server(phases_1_4, tmp_path_factory):
    database = tmp_path_factory.mktemp("review") / "review.db"
    env = {"MEDVL_REVIEW_KEY": KEY, "MEDVL_DATABASE_URL": f"sqlite:///{database}"}
    with running_server(phases_1_4, extra_args=["--model", "ocr", "--api-key", API_KEY,
                                                "--set", "api.review_store=true"], env=env) as base:
        yield base


@pytest.fixture(scope="module")
def lab_page(phases_1_4):
    return next((phases_1_4 / "datasets" / "test_images").glob("*lab_results*.png"))


def file_page(base: str, page) -> dict:
    r = httpx.post(f"{base}/extract?review=true", files={"file": ("p.png", page.read_bytes(), "image/png")},
                   headers=HEADERS, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_filed_page_is_corrected_and_exported_and_the_audit_holds_no_value(review_server, lab_page, phases_1_4):
    base = review_server
    answer = file_page(base, lab_page)
    doc_id = answer["review_id"]
    assert doc_id and answer["structured"]["lab_values"]
    listed = httpx.get(f"{base}/review", headers=HEADERS, timeout=30).json()
    assert doc_id in [d["id"] for d in listed["documents"]] and "structured" not in json.dumps(listed)
    shown = httpx.get(f"{base}/review/{doc_id}", headers=HEADERS, timeout=30).json()
    assert shown["status"] == "pending" and shown["version"] == 1 and shown["pages"] == 1
    assert shown["result"]["structured"] == answer["structured"] and shown["result"]["items"] == answer["items"]
    image = httpx.get(f"{base}/review/{doc_id}/pages/1", headers=HEADERS, timeout=30)
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == Image.open(lab_page).size

    original = answer["structured"]["lab_values"][0]["value"]
    save = {"version": 1, "status": "done", "reviewer": "dr.alice",
            "decisions": [{"pointer": "/lab_values/0/value", "action": "correct", "value": CORRECTED},
                          {"pointer": "/lab_values/1", "action": "accept"}]}
    r = httpx.put(f"{base}/review/{doc_id}", json=save, headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "corrected" and r.json()["version"] == 2 and r.json()["reviewed_by"] == "dr.alice"
    stale = httpx.put(f"{base}/review/{doc_id}", json={**save, "reviewer": "dr.bob"}, headers=HEADERS, timeout=30)
    assert stale.status_code == 409 and "version 2, not 1" in stale.json()["error"]["message"]
    bad = httpx.put(f"{base}/review/{doc_id}", headers=HEADERS, timeout=30, json={
        "version": 2, "status": "done", "decisions": [{"pointer": "/lab_values/99", "action": "reject"}]})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_decisions"
    assert "/lab_values/99" in bad.json()["error"]["message"]

    exported = httpx.get(f"{base}/review/export", headers=HEADERS, timeout=60)
    assert exported.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in exported.text.splitlines()]
    mine = [row for row in rows if row["document_id"] == doc_id]
    assert len(mine) == 1 and mine[0]["record"]["lab_values"][0]["value"] == CORRECTED
    assert Image.open(io.BytesIO(base64.b64decode(mine[0]["image_png_base64"]))).size == Image.open(lab_page).size

    audit = [json.loads(line) for line in (phases_1_4 / "logs" / "audit.jsonl").read_text().splitlines()]
    reviews = [line["review"] for line in audit if "review" in line]
    assert {"action": "file", "document_id": doc_id, "status": "pending", "version": 1} in reviews
    saved = next(r for r in reviews if r["action"] == "save" and r.get("status") == "corrected"
                 and r["document_id"] == doc_id)
    assert saved["pointers"] == ["/lab_values/0/value", "/lab_values/1"] and saved["reviewer"] == "dr.alice"
    assert any(r["action"] == "export" and r["rows"] >= 1 for r in reviews)
    assert {"action": "read", "document_id": doc_id} in reviews  # who read a patient's page is audited too
    assert {"action": "read_page", "document_id": doc_id, "page": 1} in reviews
    for name in ("audit.jsonl", "api.log"):
        text = (phases_1_4 / "logs" / name).read_text()
        assert CORRECTED not in text and f'"{original}"' not in text


def test_a_fhir_answer_filed_for_review_names_its_id_in_a_header(review_server, lab_page):
    r = httpx.post(f"{review_server}/extract?review=true&format=fhir", headers=HEADERS, timeout=120,
                   files={"file": ("p.png", lab_page.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["resourceType"] == "Bundle"
    shown = httpx.get(f"{review_server}/review/{r.headers['X-Review-ID']}", headers=HEADERS, timeout=30)
    assert shown.status_code == 200 and shown.json()["status"] == "pending"


def test_two_reviewers_saving_at_once_over_http_one_is_refused(review_server, lab_page):
    doc_id = file_page(review_server, lab_page)["review_id"]

    def save(who: str) -> httpx.Response:
        return httpx.put(f"{review_server}/review/{doc_id}", headers=HEADERS, timeout=60, json={
            "version": 1, "status": "done", "reviewer": who,
            "decisions": [{"pointer": "/lab_values/0", "action": "accept" if who == "a" else "reject"}]})

    with ThreadPoolExecutor(2) as pool:
        codes = sorted(r.status_code for r in pool.map(save, ["a", "b"]))
    assert codes == [200, 409]


def test_the_review_routes_need_the_key_and_a_store(review_server, phases_1_4, lab_page):
    assert httpx.get(f"{review_server}/review", timeout=30).status_code == 401
    with running_server(phases_1_4, extra_args=["--model", "ocr"]) as plain:
        r = httpx.get(f"{plain}/review", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "review_store_off"
        r = httpx.post(f"{plain}/extract?review=true", timeout=30,
                       files={"file": ("p.png", lab_page.read_bytes(), "image/png")})
        assert r.status_code == 404 and "api.review_store" in r.json()["error"]["message"]


def test_a_server_keeping_documents_without_a_key_refuses_to_start(phases_1_4):
    env = {k: v for k, v in os.environ.items() if k != "MEDVL_REVIEW_KEY"}
    done = subprocess.run([sys.executable, "-m", "medvl.http.server", "--workdir", str(phases_1_4), "--model", "ocr",
                           "--set", "api.review_store=true"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "MEDVL_REVIEW_KEY" in done.stderr and "Traceback" not in done.stderr


def test_the_review_loop_bench_files_and_corrects_pages_to_their_truth(review_server, tmp_path):
    """bench/review_loop.py's first half against the real server: two lab reports filed from
    the OCR reading, corrected by the scripted reviewer; the export's records are the pages' own."""
    from bench.review_loop import export, file_and_correct
    from medvl.medical.documents import REVIEW_SEED, generate_document
    from medvl.review.decisions import decisions_between

    documents = [generate_document(REVIEW_SEED + i, "lab_results", prefix="rev") for i in range(2)]
    with httpx.Client(headers=HEADERS) as client:
        done = file_and_correct(review_server, documents, 2, client)
        rows = export(review_server, tmp_path / "reviewed.jsonl", client)
    assert done["documents"] == 2 and set(done["statuses"]) <= {"accepted", "corrected"}
    records = [json.loads(line)["record"] for line in (tmp_path / "reviewed.jsonl").read_text().splitlines()]
    assert rows == len(records) >= 2
    for doc in documents:  # each page's record is among the exported ones, exactly (no decision left)
        assert any(not [d for d in decisions_between(r, doc.structured()) if d.action != "accept"] for r in records)
