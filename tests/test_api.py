"""The real API server on the tiny model: every endpoint, bad inputs, concurrency, loading."""

import base64
import io
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from medvl.core.settings import load_settings
from medvl.engine.loader import ServedModel
from medvl.http.server import ServerConfig, create_app
from medvl.http.validate import running_server, validate
from medvl.medical.documents import render_document
from medvl.medical.records import is_valid_record, parse_structured, repair_json

from conftest import INVENTED_LAB, REPO, drawn_box, extend_run, lab_page_document


@pytest.fixture(scope="module")
def server(phases_1_4):
    """The server on the tiny base model (phases 1-4 ran), short answers and no source boxes (the
    page's OCR, seconds on this CPU) so the suite stays quick; test_source_boxes_... turns them on."""
    with running_server(phases_1_4, extra_args=["--max-new-tokens", "48", "--max-upload-mb", "8",
                                                "--set", "api.source_boxes=false"]) as base:
        yield base


@pytest.fixture(scope="module")
def page(phases_1_4):
    return sorted((phases_1_4 / "datasets" / "test_images").glob("*.png"))[0]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_endpoint_answers(server, page):
    checks = validate(server, sorted(page.parent.glob("*.png")))
    assert all(c["ok"] for c in checks.values()), {k: v for k, v in checks.items() if not v["ok"]}


def test_health_reports_the_decoder_and_its_one_off_start_up_cost(server):
    body = httpx.get(f"{server}/health", timeout=5).json()
    assert body["decoding"].startswith("continuous batching")  # the CPU: not compiled ("auto")
    assert body["startup_s"]["load"] > 0 and body["startup_s"]["decoder_warm_up"] > 0


def test_extract_returns_the_documented_envelope(server, page):
    r = httpx.post(f"{server}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=120)
    body = r.json()
    assert r.status_code == 200
    assert set(body["structured"]) == {"medications", "diagnoses", "procedures", "lab_values", "vitals"}
    assert body["parse_status"] == "json" and is_valid_record(body["raw_text"])  # decoded under the record's schema
    assert body["usage"]["completion_tokens"] > 0 and body["latency_s"] > 0
    assert body["model"]["kind"] == "base" and body["model"]["form"] == "bf16"  # tiny's served form: full precision
    # each item's confidence (its least sure field's) and the review list, least sure first (with
    # 48 tokens the tiny model's record may hold no item: tests/test_engine.py reads a longer one)
    items = {item["pointer"]: item for item in body["items"]}
    assert "needs_review" in body and all(0 < item["confidence"] <= 1 for item in items.values())
    assert all(item["confidence"] == min(item["fields"].values()) for item in items.values() if item["fields"])
    unsure = sorted((i for i in items.values() if i["confidence"] < 0.5), key=lambda i: i["confidence"])
    assert body["needs_review"] == [i["pointer"] for i in unsure]


def test_server_serves_the_awq_checkpoint_4_bit_when_asked(phases_1_4, page):
    """--weights awq: phase 4's compressed-tensors checkpoint in the int4 kernel, /extract as usual."""
    with running_server(phases_1_4, extra_args=["--weights", "awq", "--max-new-tokens", "48"]) as base:
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert health["weights"] == "awq" and health["model_path"].endswith("tiny-qwen25-vl-awq-int4")
        assert "AWQ int4" in health["decoding"]
        r = httpx.post(f"{base}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=120)
        assert r.status_code == 200 and r.json()["model"]["form"] == "awq"
        assert is_valid_record(r.json()["raw_text"])


def test_each_lab_value_gets_a_confidence_and_the_box_its_text_was_drawn_in(phases_1_4, tiny_settings,
                                                                            lab_page_model):
    """/extract on the tiny run's lab page, served by a model taught that page (conftest), with
    source boxes on (the default), the page read in two worker processes: every lab value the page shows has a confidence in [0, 1] and
    a box that contains the value's text where the document generator drew it (within 8 px); the
    lab the page does not show gets no box at all and is the first item in needs_review that is there for a missing box."""
    doc = lab_page_document(tiny_settings)
    page = next((phases_1_4 / "datasets" / "test_images").glob("*lab_results*.png"))
    image = Image.open(page)
    assert image.tobytes() == render_document(doc).tobytes()  # the page is the generator's own drawing
    server_log = phases_1_4 / "logs" / "api_server_stdout.log"
    logged = server_log.stat().st_size if server_log.is_file() else 0
    # api.ocr_workers=2: the page is read in the server's reading pool (worker processes), as on a GPU host
    with running_server(phases_1_4, extra_args=["--model", str(lab_page_model), "--set", "api.ocr_workers=2"]) as base:
        r = httpx.post(f"{base}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=300)
        started = httpx.get(f"{base}/health", timeout=5).json()["startup_s"]
    assert b"OCR reads pages in 2 worker processes" in server_log.read_bytes()[logged:]
    assert started["ocr_workers_after_decoder"] >= 0  # the workers started beside the load, waited for at the end
    body = r.json()
    labs = doc.structured()["lab_values"]
    assert r.status_code == 200 and body["structured"]["lab_values"] == [*labs, INVENTED_LAB], body
    items = {item["pointer"]: item for item in body["items"]}
    width, height = image.size
    for i, lab in enumerate(labs):
        item = items[f"/lab_values/{i}"]
        assert 0 <= item["confidence"] <= 1 and item["page"] == 1
        x0, y0, x1, y1 = drawn_box(doc, lab["name"], lab["value"])
        bx0, by0, bx1, by1 = item["boxes"]["value"]
        assert bx0 * width <= x0 + 8 and bx1 * width >= x1 - 8 and by0 * height <= (y0 + y1) / 2 <= by1 * height, \
            (lab, item["boxes"]["value"], (x0, y0, x1, y1))
    invented = items[f"/lab_values/{len(labs)}"]
    assert 0 <= invented["confidence"] <= 1
    assert invented["boxes"] and set(map(str, invented["boxes"].values())) == {"None"}
    # reviewed after any unsure item, before an item with only its reference range missed by the OCR
    unsure = [item["pointer"] for item in body["items"] if item["confidence"] < tiny_settings.api.review_below_confidence]
    assert body["needs_review"][len(unsure)] == invented["pointer"]


def test_server_with_the_ocr_baseline_extracts_records_with_flags(phases_1_4):
    """--model ocr: /extract answers from OCR + rules, with the model's envelope and flags;
    the routes only a model can answer say so with a 400."""
    page = next((phases_1_4 / "datasets" / "test_images").glob("*lab_results*.png"))
    truth = json.loads(page.with_suffix(".json").read_text())["document"]
    with running_server(phases_1_4, extra_args=["--model", "ocr"]) as base:
        health = httpx.get(f"{base}/health", timeout=5).json()
        assert health["status"] == "ok" and health["weights"] == "ocr" and "rapidocr" in health["decoding"]
        r = httpx.post(f"{base}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=120)
        body = r.json()
        assert r.status_code == 200 and body["parse_status"] == "ocr" and body["model"]["kind"] == "ocr"
        read = {lab["name"]: lab for lab in body["structured"]["lab_values"]}
        assert {lab["name"] for lab in truth["lab_values"]} == set(read)
        flagged = [lab for lab in truth["lab_values"] if lab["flag"]]
        assert flagged and all(read[lab["name"]]["flag"] == lab["flag"] for lab in flagged)
        # every lab value the rules read has the box of its own OCR text (tests/test_sources.py checks
        # boxes against the generator's layout); none has a confidence: the rules give none
        labs = [item for item in body["items"] if item["pointer"].startswith("/lab_values/")]
        assert len(labs) == len(read) and all(item["boxes"]["value"] is not None for item in labs)
        assert all(0 <= v <= 1 for item in labs for box in item["boxes"].values() if box for v in box)
        assert all(item["confidence"] is None for item in body["items"])
        assert set(body["needs_review"]) == {item["pointer"] for item in body["items"]}
        assert isinstance(body["flags"], list) and body["disclaimer"]
        r = httpx.post(f"{base}/analyze", files={"file": ("p.png", page.read_bytes(), "image/png")},
                       data={"prompt": "Describe."}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_by_model"


def test_ocr_grounded_prompt_setting_reaches_the_served_prompt(server, phases_1_4, page):
    """With --set data.ocr_grounded_prompt=true the server reads the page first and prompts
    with its text, as training did: the same page costs more prompt tokens."""
    def prompt_tokens(base: str) -> int:
        r = httpx.post(f"{base}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    plain = prompt_tokens(server)
    with running_server(phases_1_4, extra_args=["--max-new-tokens", "8", "--set", "data.ocr_grounded_prompt=true"]) as base:
        assert prompt_tokens(base) > plain + 20


def test_openai_chat_non_streaming_payload(server, page):
    url = "data:image/png;base64," + base64.b64encode(page.read_bytes()).decode()
    payload = {"model": "medvl", "max_tokens": 8, "messages": [
        {"role": "system", "content": "You are a clinical assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}]}
    body = httpx.post(f"{server}/v1/chat/completions", json=payload, timeout=120).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 8
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


BAD_INPUTS = {
    "zero-byte file": (("e.png", b"", "image/png"), 400, "empty_file"),
    "text file named .png": (("notes.png", b"Patient on metformin 500 mg BID\n" * 20, "image/png"), 400, "bad_image"),
    "truncated PNG": (("cut.png", png(Image.new("RGB", (300, 300), "white"))[:200], "image/png"), 400, "bad_image"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_uploads_get_a_4xx_envelope_and_the_server_keeps_serving(server, page, name):
    upload, status, code = BAD_INPUTS[name]
    r = httpx.post(f"{server}/extract", files={"file": upload}, timeout=60)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200


def test_huge_image_and_huge_upload_are_413(server):
    giant = Image.new("1", (20000, 20000), 1)  # 400 M pixels, a few hundred KB as PNG
    r = httpx.post(f"{server}/extract", files={"file": ("big.png", png(giant), "image/png")}, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = httpx.post(f"{server}/extract", files={"file": ("big.bin", b"\x89PNG" + b"0" * (9 * 2**20), "image/png")},
                   timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_huge_prompt_bad_base64_and_missing_fields(server, page):
    r = httpx.post(f"{server}/analyze", files={"file": ("p.png", page.read_bytes(), "image/png")},
                   data={"prompt": "x" * 50_000}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_prompt"
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}]}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=bad, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_base64"
    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}
    assert httpx.post(f"{server}/v1/chat/completions", json=remote, timeout=60).json()["error"]["code"] == "bad_image_url"
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "medvl"}, timeout=60)
    assert r.status_code == 422 and "messages" in r.json()["error"]["message"]
    r = httpx.post(f"{server}/analyze", data={"prompt": "hi"}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert httpx.get(f"{server}/nope", timeout=5).json()["error"]["status"] == 404


def test_32_concurrent_extracts_are_all_answered(server, page):
    data = page.read_bytes()

    def one(_):
        return httpx.post(f"{server}/extract", files={"file": ("p.png", data, "image/png")}, timeout=300)

    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(one, range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    assert len({b["request_id"] for b in bodies}) == 32
    # Same image, same greedy decoding: batching must not change the answer.
    assert len({b["raw_text"] for b in bodies}) == 1
    metrics = httpx.get(f"{server}/metrics", timeout=5).text
    assert 'medvl_requests_total{route="/extract",status="200"}' in metrics


def test_api_key_guards_every_route_but_health(phases_1_4):
    with running_server(phases_1_4, extra_args=["--max-new-tokens", "4"], env={"MEDVL_API_KEY": "s3cret"}) as base:
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        r = httpx.get(f"{base}/benchmark", timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{base}/benchmark", headers={"X-API-Key": "s3cret"}, timeout=5).status_code == 200
        assert httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer s3cret"}, timeout=5).status_code == 200
    # the audit trail names the client by its key's fingerprint, never by the key
    from medvl.http.audit import client_fingerprint

    audit = (phases_1_4 / "logs" / "audit.jsonl").read_text()
    assert "s3cret" not in audit
    clients = {(line["route"], line["status"], line["client"]) for line in map(json.loads, audit.splitlines())}
    assert ("/benchmark", 401, "anonymous") in clients and ("/benchmark", 200, client_fingerprint("s3cret")) in clients


def test_inference_routes_answer_503_until_the_model_is_loaded(phases_1_4):
    served = ServedModel(phases_1_4 / "models" / "tiny-qwen25-vl-awq-int4", load_settings("tiny"), "awq")
    app = create_app(ServerConfig(workdir=str(phases_1_4)), served=served)
    client = TestClient(app)  # no lifespan: the model never starts loading, as in the first seconds
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["model_loaded"] is False
    r = client.post("/extract", files={"file": ("p.png", png(Image.new("RGB", (64, 64))), "image/png")})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "model_loading"


def test_structured_parsing_repairs_then_falls_back():
    good = '{"medications": [{"name": "Aspirin", "dose": "81 mg", "route": "PO", "frequency": "QD"}], "diagnoses": ["CAD"]}'
    assert parse_structured(good)[1] == "json"
    structured, status = parse_structured('```json\n{"medications": [{"name": "Aspirin", "dose": "81 mg",}], "diagnoses": ["CAD"')
    assert status == "repaired" and structured["medications"][0]["name"] == "Aspirin"
    assert structured["diagnoses"] == ["CAD"]
    structured, status = parse_structured("Patient takes Metformin 500 mg twice daily for DM2.")
    assert status == "fallback"
    assert structured["medications"][0] == {"name": "Metformin", "dose": "500 mg", "route": "", "frequency": ""}
    assert structured["diagnoses"] == ["DM2"]
    assert repair_json('{"a": [1, 2') == {"a": [1, 2]}
    assert json.dumps(parse_structured("")[0]) == json.dumps(
        {"medications": [], "diagnoses": [], "procedures": [], "lab_values": [], "vitals": {}})


def test_perf_serving_smoke_run_measures_every_level_over_http(phases_1_2, tmp_path_factory):
    """bench/perf_serving.py on the CPU: the real server, closed-loop clients per route and
    count, one record per level with the fields the README quotes, no errors."""
    wd = extend_run(phases_1_2, (), tmp_path_factory, "serving")
    # (no source boxes: their OCR, ~3 s a page on this CPU, is longer than these 2-s windows)
    result = subprocess.run([sys.executable, "bench/perf_serving.py", "--workdir", str(wd), "--clients", "1,3",
                             "--seconds", "2", "--warm-up-s", "0.5", "--max-tokens", "8", "--set", "api.source_boxes=false"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((wd / "benchmarks" / "perf_serving.json").read_text())
    assert report["startup_to_health_200_s"] > 0 and "decoder_warm_up" in report["startup_s"]
    assert [(r["route"], r["clients"]) for r in report["levels"]] == [
        ("mixed", 1), ("mixed", 3), ("extract", 1), ("extract", 3), ("chat", 1), ("chat", 3)]
    assert len(report["mixed_pages"]) == 5
    for level in report["levels"]:
        assert level["errors"] == 0 and level["requests"] > 0 and level["requests_per_s"] > 0
        if level["route"] == "chat":  # ignore_eos: every answer is max_tokens long
            assert level["tokens_per_request"] == 8
        elif level["route"] == "mixed":  # drawn lengths: 32 to 256, or the end-of-sequence token
            assert 0 < level["tokens_per_request"] <= 256 and "client_ttft_s" in level
        else:  # /extract ends at the end-of-sequence token or the server's 8
            assert 0 < level["tokens_per_request"] <= 8
        assert level["ttft_s"]["n"] > 0 and level["engine"]["steps"] > 0


def test_uploads_stay_in_memory_and_over_the_limit_are_refused_before_reading(phases_1_4, monkeypatch):
    """A page over 1 MB once went to a temporary file (Starlette spools multipart parts there);
    now every part stays in memory, and a body over the limit is a 413 from its Content-Length, or
    while it is read when it comes without one (chunked), never after all of it arrived."""
    import tempfile

    rolled_over = []
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: rolled_over.append(1) or real(*a, **k))
    settings = load_settings("tiny", ["api.max_upload_mb=4"])
    served = ServedModel(phases_1_4 / "models" / "tiny-qwen25-vl-base", settings)
    client = TestClient(create_app(ServerConfig(workdir=str(phases_1_4), settings=settings), served=served))
    big_page = png(Image.effect_noise((1100, 1100), 60).convert("RGB"))  # ~3.6 MB of PNG: under 4 MB
    assert 1 << 20 < len(big_page) < 4 << 20
    r = client.post("/extract", files={"file": ("p.png", big_page, "image/png")})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"  # parsed, then refused: not loaded
    assert rolled_over == []  # the 3.6 MB part never touched the disk
    too_big = b"\x89PNG" + bytes(7 << 20)
    r = client.post("/extract", files={"file": ("p.png", too_big, "image/png")}, headers={"X-Request-ID": "big-1"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large" and "bytes or more" in r.text
    # refused before the app saw it, yet audited and answered with its request id
    assert r.headers["X-Request-ID"] == "big-1"
    audit = [json.loads(line) for line in (phases_1_4 / "logs" / "audit.jsonl").read_text().splitlines()]
    assert any(line["request_id"] == "big-1" and line["status"] == 413 and line["route"] == "/extract"
               for line in audit)

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(16):
            yield bytes(1 << 20)

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert rolled_over == []


def document_values(doc) -> set[str]:
    """Every value a test document holds (names, doses, lab values with units, vitals, lines of
    its text), long enough not to occur in a log line by chance."""
    values = {doc.title, *doc.lines, *doc.diagnoses, *doc.procedures, *doc.findings}
    for item in [*doc.medications, *doc.lab_values]:
        values |= set(item.values())
        if "value" in item and item.get("unit"):
            values.add(f"{item['value']} {item['unit']}")
    values |= {f"{name} {value}" for name, value in doc.vitals.items()}
    return {v for v in values if len(v) >= 5 and any(c.isalpha() for c in v)}


def test_audit_trail_names_request_document_and_model_but_holds_no_patient_data(server, phases_1_4):
    import hashlib

    from medvl.medical.documents import benchmark_documents, render_document

    doc = benchmark_documents(4242, 4)[2]  # a lab report: analytes, values, units, flags
    data = png(render_document(doc))
    files = {"file": ("p.png", data, "image/png")}
    sent = httpx.post(f"{server}/extract", files=files, headers={"X-Request-ID": "ward-7.req:0042"}, timeout=120)
    fresh = httpx.post(f"{server}/analyze", files=files, data={"prompt": "Summarise."},
                       headers={"X-Request-ID": "bad id; drop table"}, timeout=120)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    chat = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
        "model": "medvl", "max_tokens": 8, "stream": True,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "What is on the page?"}]}]})
    assert sent.status_code == fresh.status_code == chat.status_code == 200, (sent.text, fresh.text, chat.text)
    # the client's well-formed id is kept (header and body); a malformed one is replaced
    assert sent.headers["X-Request-ID"] == sent.json()["request_id"] == "ward-7.req:0042"
    assert fresh.headers["X-Request-ID"] == fresh.json()["request_id"] != "bad id; drop table"
    assert len(chat.headers["X-Request-ID"]) == 32

    logs = phases_1_4 / "logs"
    lines = [json.loads(line) for line in (logs / "audit.jsonl").read_text().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    digest = hashlib.sha256(data).hexdigest()
    for response, route in ((sent, "/extract"), (fresh, "/analyze"), (chat, "/v1/chat/completions")):
        line = by_id[response.headers["X-Request-ID"]]
        assert (line["route"], line["method"], line["status"]) == (route, "POST", 200)
        assert line["document_sha256"] == digest and line["pages"] == 1
        assert line["client"] == "anonymous" and line["latency_s"] > 0
        assert line["served_form"] == "bf16" and line["model_path"].endswith("-base")
        assert len(line["settings_hash"]) >= 8 and line["tokens"]["completion_tokens"] > 0
    health = [line for line in lines if line["route"] == "/health"]
    assert health and health[-1]["document_sha256"] is None

    values = document_values(doc)
    assert len(values) > 15, values
    for name in ("audit.jsonl", "api.log"):
        text = (logs / name).read_text()
        leaked = sorted(v for v in values if v in text)
        assert not leaked, f"{name} holds document values: {leaked[:5]}"
    assert base64.b64encode(data).decode()[:64] not in (logs / "audit.jsonl").read_text()


def test_audit_ids_fingerprints_and_rotation(tmp_path):
    from medvl.http.audit import AuditTrail, RequestAudit, client_fingerprint, request_id

    assert request_id("abc-1.2:3") == "abc-1.2:3"
    for bad in (None, "", "x" * 129, "two words", "line\nbreak", "é"):
        assert len(request_id(bad)) == 32 and request_id(bad) != bad
    key = "sk-very-secret-key"
    assert client_fingerprint(key).startswith("sha256:") and key not in client_fingerprint(key)
    assert client_fingerprint(key) == client_fingerprint(key) != client_fingerprint(key + "2")
    assert client_fingerprint(None) == "anonymous"

    trail = AuditTrail(tmp_path / "audit.jsonl", max_mb=1 / 1024, backups=2,
                       model={"model_path": "m", "served_form": "bf16", "settings_hash": "h"})
    for i in range(60):  # ~250 bytes a line: past 1 KiB several times
        audit = RequestAudit(f"r{i}", "anonymous")
        audit.document(b"page bytes", pages=1)
        trail.write(audit, "POST", "/extract", 200, 0.5)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 1024 + 300 for p in tmp_path.iterdir())
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert last["request_id"] == "r59" and last["pages"] == 1 and "page bytes" not in json.dumps(last)


def test_extract_as_fhir_returns_a_valid_bundle_naming_the_model(server, page):
    import hashlib

    from fhir.resources.R4B.bundle import Bundle

    data = page.read_bytes()
    r = httpx.post(f"{server}/extract?format=fhir", files={"file": ("p.png", data, "image/png")}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(r.text)
    kinds = [e.resource.get_resource_type() for e in bundle.entry]
    assert {"Patient", "DocumentReference", "Device", "Provenance"} <= set(kinds)
    document = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "DocumentReference")
    assert document.identifier[0].value == hashlib.sha256(data).hexdigest()
    assert document.content[0].attachment.contentType == "image/png" and document.content[0].attachment.data is None
    device = next(e.resource for e in bundle.entry if e.resource.get_resource_type() == "Device")
    assert device.deviceName[0].name.endswith("-base") and "bf16" in {v.value for v in device.version}
    bad = httpx.post(f"{server}/extract?format=xml", files={"file": ("p.png", data, "image/png")}, timeout=60)
    assert bad.status_code == 422 and "format" in bad.json()["error"]["message"]


def two_page_pdf() -> tuple[bytes, list]:
    from medvl.medical.documents import document_pdf, packet_documents

    docs = packet_documents(4343)  # a discharge summary, then lab results
    return document_pdf(docs), docs


def test_a_two_page_pdf_through_the_ocr_server_gives_items_from_both_pages_with_their_pages(phases_1_4, tmp_path):
    """The OCR baseline reads the real values, so the page of each item can be checked against
    the generator's pages: page 1's medications and diagnoses, page 2's lab values. The demo's
    client shows the pages, the items by page and the FHIR view from the same server."""
    from medvl.http.demo_ui import ApiClient, document_pages, extraction_view

    data, (summary, labs) = two_page_pdf()
    with running_server(phases_1_4, extra_args=["--model", "ocr"]) as base:
        path = tmp_path / "packet.pdf"
        path.write_bytes(data)
        assert len(document_pages(str(path))) == 2
        pages = document_pages(str(path))
        _, rows, line, drawn = extraction_view(ApiClient(base).extract(str(path)), pages)
        assert {row[1] for row in rows} == {1, 2} and "2 page(s)" in line
        lab_rows = [row for row in rows if row[2].startswith("/lab_values/") and row[1] == 2]
        assert any(labs.lab_values[0]["value"] in row[3] for row in lab_rows), rows
        # the OCR baseline gives no confidences: every item is to review; its values are on the page,
        # so page 2 comes back with boxes drawn (pixels changed) and each lab row says "found"
        assert all(row[0] == "review" for row in rows) and any(row[5] == "found" for row in lab_rows)
        assert len(drawn) == 2 and list(drawn[1].getdata()) != list(pages[1].convert("RGB").getdata())
        _, _, fhir_line, _ = extraction_view(ApiClient(base).extract(str(path), "fhir"))
        assert fhir_line.startswith("FHIR R4B Bundle:") and "Observation" in fhir_line
        r = httpx.post(f"{base}/extract", files={"file": ("packet.pdf", data, "application/pdf")}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [p["page"] for p in body["pages"]] == [1, 2] and body["raw_text"].count("\f") == 1
        record, pages = body["structured"], {i["pointer"]: i["page"] for i in body["items"]}
        assert len(pages) == len(body["items"])  # one entry per item
        page_of = {}
        for pointer, page in pages.items():
            key, index = pointer.split("/")[1:3]
            item = record[key][int(index)] if key != "vitals" else index
            page_of[json.dumps(item, sort_keys=True)] = page
        page2_labs = [lab for lab in record["lab_values"] if lab["name"] in {x["name"] for x in labs.lab_values}
                      and lab["value"] in {x["value"] for x in labs.lab_values}]
        assert len(page2_labs) >= len(labs.lab_values) - 1, (record["lab_values"], labs.lab_values)
        assert all(page_of[json.dumps(lab, sort_keys=True)] == 2 for lab in page2_labs)
        page1_meds = [m for m in record["medications"] if m["name"] in {x["name"] for x in summary.medications}]
        assert page1_meds and all(page_of[json.dumps(m, sort_keys=True)] == 1 for m in page1_meds)
        assert 1 in pages.values() and 2 in pages.values()


def test_a_two_page_pdf_through_the_model_answers_every_page_and_audits_two_pages(server, phases_1_4):
    data, _ = two_page_pdf()
    files = {"file": ("packet.pdf", data, "application/pdf")}
    r = httpx.post(f"{server}/extract", files=files, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["page"] for p in body["pages"]] == [1, 2] and body["raw_text"].count("\f") == 1
    assert body["usage"]["completion_tokens"] == sum(p["usage"]["completion_tokens"] for p in body["pages"]) > 0
    assert all(i["page"] in (1, 2) for i in body["items"])
    analyzed = httpx.post(f"{server}/analyze", files=files, data={"prompt": "Summarise."}, timeout=120)
    assert analyzed.status_code == 200, analyzed.text
    answer = analyzed.json()
    assert [p["page"] for p in answer["pages"]] == [1, 2] and answer["text"].startswith("Page 1:\n")
    fhir = httpx.post(f"{server}/extract?format=fhir", files=files, timeout=120)
    assert fhir.status_code == 200
    attachment = [e["resource"] for e in fhir.json()["entry"]
                  if e["resource"]["resourceType"] == "DocumentReference"][0]["content"][0]["attachment"]
    assert attachment == {"contentType": "application/pdf", "size": len(data)}
    lines = [json.loads(line) for line in (phases_1_4 / "logs" / "audit.jsonl").read_text().splitlines()]
    line = next(x for x in lines if x["request_id"] == r.headers["X-Request-ID"])
    assert line["pages"] == 2 and line["tokens"]["completion_tokens"] == body["usage"]["completion_tokens"]


def test_bad_pdfs_are_400s_naming_the_problem_and_the_server_keeps_serving(server, page):
    import pypdf

    data, _ = two_page_pdf()
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(data))
    writer.encrypt("secret", algorithm="RC4-128")
    locked = io.BytesIO()
    writer.write(locked)
    blank = Image.new("RGB", (60, 80), "white")
    long = io.BytesIO()
    blank.save(long, format="PDF", save_all=True, append_images=[blank] * 20)  # 21 pages; the limit is 20
    cases = {"encrypted_pdf": (locked.getvalue(), "password"), "truncated_pdf": (data[: len(data) // 3], "truncated"),
             "too_many_pages": (long.getvalue(), "21 pages; the limit is 20")}
    for code, (body, words) in cases.items():
        for route in ("/extract", "/analyze"):
            r = httpx.post(f"{server}{route}", files={"file": ("d.pdf", body, "application/pdf")}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["code"] == code, (route, r.text)
            assert words in r.json()["error"]["message"]
    r = httpx.post(f"{server}/extract", files={"file": ("p.png", page.read_bytes(), "image/png")}, timeout=120)
    assert r.status_code == 200
