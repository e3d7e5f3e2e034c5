"""The review store on SQLite and on a real PostgreSQL: filing, listing, deciding, exporting;
two reviewers saving at once; patient data unreadable at rest; migrations in step with the models."""

from __future__ import annotations

import base64
import io
import threading
import uuid

import pytest
from PIL import Image, ImageDraw
from sqlalchemy import create_engine, text

from medvl.review.crypto import Cipher
from medvl.review.decisions import BadDecisions, Decision, check, corrected, page_records
from medvl.review.errors import Conflict, NotFound, ReviewKeyError
from medvl.review.store import ReviewStore

KEY = "x9b0mO0Jp0H1o5l8yM2fS0tqH2xY6bXHk3r1Yl5m4bA="  # a Fernet key made for these tests
RESULT = {
    "structured": {
        "medications": [{"name": "Metformin", "dose": "50 mg", "route": "PO", "frequency": "BID"},
                        {"name": "Aspirin", "dose": "81 mg", "route": "PO", "frequency": "QD"}],
        "diagnoses": ["Hypertension"], "procedures": [],
        "lab_values": [{"name": "Creatinine", "value": "1.4", "unit": "mg/dL", "flag": "H",
                        "reference_range": "0.6-1.2"}],
        "vitals": {"heart_rate": "88 bpm"}},
    "items": [{"pointer": "/medications/0", "page": 1, "confidence": 0.31},
              {"pointer": "/medications/1", "page": 1, "confidence": 0.9},
              {"pointer": "/diagnoses/0", "page": 1, "confidence": 0.95},
              {"pointer": "/lab_values/0", "page": 2, "confidence": 0.8},
              {"pointer": "/vitals/heart_rate", "page": 2, "confidence": 0.7}],
    "needs_review": ["/medications/0"],
}
# The reviewer's decisions of the module doc's worked example
DECISIONS = [Decision("/medications/0/dose", "correct", "500 mg"), Decision("/medications/1", "reject"),
             Decision("/diagnoses/0", "accept"), Decision("/diagnoses", "add", "CKD 3b", page=2)]


def pages() -> list[Image.Image]:
    out = []
    for colour in ("white", "ivory"):
        page = Image.new("RGB", (200, 260), colour)
        ImageDraw.Draw(page).text((10, 10), "Metformin 500 mg PO BID", fill="black")
        out.append(page)
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """A database URL of each kind, empty: a file for SQLite, a fresh database on the real server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'review.db'}"
        return
    server = request.getfixturevalue("postgres_url")
    name = f"review_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield server.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def store(database):
    opened = ReviewStore(database, Cipher(KEY))
    yield opened
    opened.close()


def file_one(store: ReviewStore) -> dict:
    return store.file(pages=pages(), document_sha256="ab" * 32, content_type="application/pdf", result=RESULT,
                      filed_by="sha256:client", request_id="req-1", model_path="models/m", model_form="awq")


def test_file_list_decide_and_export(store):
    filed = file_one(store)
    assert filed["status"] == "pending" and filed["version"] == 1 and filed["items_to_review"] == 1
    listed = store.list("pending")
    assert listed["total"] == 1 and listed["documents"][0]["id"] == filed["id"]
    assert "structured" not in listed["documents"][0]  # a list shows no patient data
    shown = store.get(filed["id"])
    assert shown["result"] == RESULT and shown["decisions"] == []
    assert Image.open(io.BytesIO(store.page(filed["id"], 2))).size == (200, 260)
    with pytest.raises(NotFound):
        store.page(filed["id"], 3)
    with pytest.raises(NotFound):
        store.get("nope")
    assert list(store.export()) == []  # nothing reviewed yet

    saved = store.decide(filed["id"], 1, DECISIONS[:1], "pending", "sha256:alice")  # progress, kept open
    assert saved["status"] == "pending" and saved["version"] == 2
    done = store.decide(filed["id"], 2, DECISIONS, "done", "sha256:alice")
    assert done["status"] == "corrected" and done["version"] == 3 and done["reviewed_by"] == "sha256:alice"
    assert [(d["pointer"], d["action"], d["value"]) for d in done["decisions"]] == [
        (d.pointer, d.action, d.value) for d in DECISIONS]
    assert store.list("pending")["total"] == 0 and store.list("corrected")["total"] == 1

    rows = list(store.export())
    assert [(r["page"], r["pages"]) for r in rows] == [(1, 2), (2, 2)]
    first, second = (r["record"] for r in rows)
    assert first["medications"] == [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"}]
    assert first["diagnoses"] == ["Hypertension"] and second["diagnoses"] == ["CKD 3b"]
    assert second["lab_values"][0]["name"] == "Creatinine" and second["vitals"] == {"heart_rate": "88 bpm"}
    assert Image.open(io.BytesIO(base64.b64decode(rows[1]["image_png_base64"]))).size == (200, 260)


def test_an_acceptance_without_changes_is_accepted_and_a_rejected_document_never_exported(store):
    accepted, rejected = file_one(store), file_one(store)
    assert store.decide(accepted["id"], 1, [Decision("/diagnoses/0", "accept")], "done", "r")["status"] == "accepted"
    assert store.decide(rejected["id"], 1, [], "rejected", "r")["status"] == "rejected"
    assert {row["document_id"] for row in store.export()} == {accepted["id"]}


def test_a_stale_save_is_refused_and_loses_nothing(store):
    filed = file_one(store)
    store.decide(filed["id"], 1, DECISIONS, "done", "sha256:alice")
    with pytest.raises(Conflict, match="at version 2, not 1.*sha256:alice"):
        store.decide(filed["id"], 1, [Decision("/medications/0", "reject")], "done", "sha256:bob")
    kept = store.get(filed["id"])
    assert kept["version"] == 2 and len(kept["decisions"]) == len(DECISIONS)


def test_two_reviewers_saving_at_once_one_wins_whole_the_other_is_refused(store):
    filed = file_one(store)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}
    mine = {"alice": DECISIONS, "bob": [Decision("/medications/1", "accept"), Decision("/diagnoses/0", "reject")]}

    def save(who: str) -> None:
        barrier.wait()
        try:
            outcomes[who] = store.decide(filed["id"], 1, mine[who], "done", who)
        except Conflict as exc:
            outcomes[who] = exc

    threads = [threading.Thread(target=save, args=(who,)) for who in mine]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    refused = [who for who, out in outcomes.items() if isinstance(out, Conflict)]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    winner = next(who for who in mine if who not in refused)
    kept = store.get(filed["id"])
    assert kept["version"] == 2 and kept["reviewed_by"] == winner
    assert [(d["pointer"], d["action"]) for d in kept["decisions"]] == [(d.pointer, d.action) for d in mine[winner]]


def test_bad_decisions_are_refused_all_at_once_and_nothing_is_written(store):
    filed = file_one(store)
    bad = [Decision("/medications/7", "accept"), Decision("/medications/0/colour", "correct", "x"),
           Decision("/medications/1", "correct", {"name": "X", "strength": "1"}), Decision("/diagnoses/0", "keep"),
           Decision("/diagnoses", "add", "CKD", page=9), Decision("/medications/0", "reject"),
           Decision("/medications/0/dose", "correct", "5 mg")]
    with pytest.raises(BadDecisions) as refused:
        store.decide(filed["id"], 1, bad, "done", "r")
    message = str(refused.value)
    for part in ("decision 0", "decision 1", "decision 2", "decision 3", "decision 4",
                 "/medications/0 is rejected and has decisions on its fields too"):
        assert part in message
    assert store.get(filed["id"])["version"] == 1


def test_patient_data_is_unreadable_at_rest(store, database):
    filed = file_one(store)
    store.decide(filed["id"], 1, DECISIONS, "done", "sha256:alice")
    raw = create_engine(database)
    with raw.connect() as connection:
        cells = [cell for table in ("review_documents", "review_pages", "review_decisions")
                 for row in connection.execute(text(f"SELECT * FROM {table}")) for cell in row]
    raw.dispose()
    blob = b"".join(bytes(c) if isinstance(c, (bytes, memoryview)) else str(c).encode() for c in cells)
    for value in ("Metformin", "500 mg", "Aspirin", "Hypertension", "CKD 3b", "Creatinine", "88 bpm"):
        assert value.encode() not in blob
    assert b"\x89PNG" not in blob and b"IHDR" not in blob
    assert filed["id"].encode() in blob  # the clear columns are there: the test reads real rows
    with pytest.raises(ReviewKeyError, match="another key"):
        ReviewStore(database, Cipher(_other_key())).get(filed["id"])


def _other_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def test_the_store_refuses_to_open_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVL_REVIEW_KEY", raising=False)
    with pytest.raises(ReviewKeyError, match="MEDVL_REVIEW_KEY"):
        ReviewStore.open(tmp_path)
    with pytest.raises(ReviewKeyError, match="malformed"):
        Cipher("not-a-key")


def test_the_migrations_make_the_models_schema(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from medvl.review.models import Base

    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_corrections_apply_as_the_worked_example_says():
    check(DECISIONS, RESULT["structured"], 2)
    record, items = corrected(RESULT["structured"], RESULT["items"], DECISIONS)
    assert record["medications"] == [{"name": "Metformin", "dose": "500 mg", "route": "PO", "frequency": "BID"}]
    assert record["diagnoses"] == ["Hypertension", "CKD 3b"]
    assert {"pointer": "/diagnoses/1", "page": 2} in items
    by_page = page_records(record, items, 2)
    assert by_page[0]["diagnoses"] == ["Hypertension"] and by_page[1]["diagnoses"] == ["CKD 3b"]
    unchanged, _ = corrected(RESULT["structured"], RESULT["items"], [])
    assert unchanged == RESULT["structured"]


def test_the_review_tables_rows_become_the_decisions_its_docstring_says():
    """The demo's table (medvl/http/demo_ui.py) as decisions: the worked example of
    decisions_from_rows, then a round trip from the filed result's rows through the store's check."""
    from medvl.http.demo_ui import decisions_from_rows, review_rows

    rows = [["review", 1, "/medications/0", "dose", "50 mg", "500 mg", False],
            ["review", 1, "/medications/0", "name", "Metformin", "", False],
            ["", 1, "/diagnoses/1", "", "HTN", "", True],
            ["", 1, "/diagnoses/0", "", "CKD 3b", "", False]]
    assert decisions_from_rows(rows) == [{"pointer": "/medications/0/dose", "action": "correct", "value": "500 mg"},
                                         {"pointer": "/diagnoses/1", "action": "reject"},
                                         {"pointer": "/diagnoses/0", "action": "accept"}]
    table = review_rows(RESULT)
    assert table[0][:3] == ["review", 1, "/medications/0"]  # the item to review first, one row per field
    assert len(table) == 4 + 4 + 1 + 5 + 1  # two medications, a diagnosis, a lab value, a vital
    table[1][5] = "500 mg"  # the dose
    decided = [Decision(**d) for d in decisions_from_rows(table)]
    check(decided, RESULT["structured"], 2)
    record, _ = corrected(RESULT["structured"], RESULT["items"], decided)
    assert record["medications"][0]["dose"] == "500 mg" and record["medications"][1] == RESULT["structured"]["medications"][1]


def test_the_scripted_reviewer_turns_a_filed_record_into_the_pages_truth():
    """decisions_between, bench/review_loop.py's reviewer: on filed records with a missed item, a wrong field, an
    invented item, a name in another case and wrong or invented vitals, its decisions pass the
    store's checks and make exactly the page's record (as sets: added items come last)."""
    import copy
    import json

    from medvl.medical.documents import KINDS, generate_document
    from medvl.review.decisions import decisions_between

    def as_sets(record):
        return {k: sorted(json.dumps(v, sort_keys=True) for v in vals) if isinstance(vals, list) else vals
                for k, vals in record.items()}

    seen: set[str] = set()
    for seed in range(25):
        truth = generate_document(seed, KINDS[seed % len(KINDS)], prefix="rev").structured()
        filed = copy.deepcopy(truth)
        if filed["medications"]:
            filed["medications"].pop()
        if filed["lab_values"]:
            filed["lab_values"][0]["value"] += "0"
            filed["lab_values"][0]["flag"] = "H" if filed["lab_values"][0]["flag"] != "H" else ""
        filed["diagnoses"] = [d.upper() for d in filed["diagnoses"]] + ["Invented disease"]
        filed["procedures"].append("Invented procedure")
        filed["vitals"] = {**{k: v + "1" for k, v in filed["vitals"].items()}, "made_up": "1 bpm"}
        items = [{"pointer": f"/{k}/{i}", "page": 1} for k in ("medications", "diagnoses", "procedures", "lab_values")
                 for i in range(len(filed[k]))] + [{"pointer": f"/vitals/{k}", "page": 1} for k in filed["vitals"]]
        decided = decisions_between(filed, truth)
        check(decided, filed, 1)
        record, _ = corrected(filed, items, decided)
        assert as_sets(record) == as_sets(truth), seed
        seen |= {d.action for d in decided}
    assert seen == {"accept", "correct", "reject", "add"}
