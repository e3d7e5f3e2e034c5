"""The review store: filed /extract results, the reviewer's decisions, the export for training.

SQLite by default (a file under the run's folder, nothing to set up), PostgreSQL when
:data:`DATABASE_URL_ENV` names one (``postgresql+psycopg://user:pass@host/db``); SQLAlchemy
speaks to both, and the schema is made and changed by Alembic's migrations
(``medvl/review/migrations``), run at open. Patient data (the upload, the model's record, the
decided values, the pages) is encrypted before it is written (:mod:`medvl.review.crypto`).

Two reviewers saving the same document: a save names the ``version`` it read and the update
matches on it (``UPDATE ... WHERE version = :read``). On PostgreSQL the second update waits on
the first's row lock, then finds the version moved and changes nothing; SQLite's transactions
here begin IMMEDIATE (the write lock first), so the second waits and then finds the same. Either
way the second save is refused with :class:`Conflict` (HTTP 409) and loses nothing of the
first's; the reviewer reloads and decides again.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select, update
from sqlalchemy.orm import Session

from medvl.review.crypto import Cipher
from medvl.review.decisions import BadDecisions, Decision, check, corrected, outcome, page_records
from medvl.review.errors import Conflict, NotFound
from medvl.review.models import STATUSES, ReviewDecision, ReviewDocument, ReviewPage

log = logging.getLogger(__name__)

DATABASE_URL_ENV = "MEDVL_DATABASE_URL"
MIGRATIONS = Path(__file__).parent / "migrations"
EXPORTED = ("accepted", "corrected")  # the statuses whose records train


def database_url(workdir: Path) -> str:
    """:data:`DATABASE_URL_ENV`, else a SQLite file at ``<workdir>/review/review.db``."""
    if url := os.environ.get(DATABASE_URL_ENV, "").strip():
        return url
    (workdir / "review").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'review' / 'review.db'}"


def _sqlite_immediate(engine: Engine) -> None:
    """SQLite: foreign keys on, WAL, and every transaction taking the write lock at BEGIN (as
    SQLAlchemy's docs recipe does), so concurrent saves queue instead of failing mid-way."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (Alembic, on this engine's connection)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def _png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _summary(row: ReviewDocument) -> dict[str, Any]:
    """What a list shows of a document: nothing of the patient's."""
    return {"id": row.id, "status": row.status, "version": row.version, "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat(), "document_sha256": row.document_sha256,
            "content_type": row.content_type, "pages": row.page_count, "items_to_review": row.items_to_review,
            "filed_by": row.filed_by, "reviewed_by": row.reviewed_by, "model_path": row.model_path,
            "model_form": row.model_form}


class ReviewStore:
    """Files, lists, shows, decides on and exports reviewed documents (see the module's doc)."""

    def __init__(self, url: str, cipher: Cipher) -> None:
        self.url = url
        self.cipher = cipher
        self.engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
        if url.startswith("sqlite"):
            _sqlite_immediate(self.engine)
        migrate(self.engine)

    @classmethod
    def open(cls, workdir: Path) -> ReviewStore:
        """The store of a run: its database (:func:`database_url`) and the key from the environment
        (raises :class:`medvl.review.crypto.ReviewKeyError` without one)."""
        cipher = Cipher.from_env()
        store = cls(database_url(workdir), cipher)
        log.info("review store: %s", store.engine.url.render_as_string(hide_password=True))
        return store

    def close(self) -> None:
        self.engine.dispose()

    def file(self, *, pages: list[Any], document_sha256: str, content_type: str, result: dict[str, Any],
             filed_by: str, request_id: str, model_path: str, model_form: str) -> dict[str, Any]:
        """Keep an /extract result (``structured``, ``items``, ``needs_review``, ...) with the
        pages it was read from (PIL images, as the server read them), as pending; returns the new
        document's summary."""
        now = _now()
        row = ReviewDocument(
            id=uuid.uuid4().hex, status="pending", version=1, created_at=now, updated_at=now,
            document_sha256=document_sha256, content_type=content_type[:100], page_count=len(pages),
            items_to_review=len(result.get("needs_review") or []), filed_by=filed_by, reviewed_by=None,
            request_id=request_id, model_path=model_path[:500], model_form=model_form,
            result=self.cipher.encrypt_json(result),
            pages=[ReviewPage(page=n, png=self.cipher.encrypt(_png(page))) for n, page in enumerate(pages, 1)])
        with Session(self.engine) as session, session.begin():
            session.add(row)
            session.flush()
            return _summary(row)

    def list(self, status: str = "pending", limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """Documents of ``status``, oldest first (most items to review first among equals), with
        the count of all of that status."""
        if status not in STATUSES:
            raise ValueError(f"status is one of {', '.join(STATUSES)}")
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(ReviewDocument)
                                   .where(ReviewDocument.status == status))
            rows = session.scalars(select(ReviewDocument).where(ReviewDocument.status == status)
                                   .order_by(ReviewDocument.created_at, ReviewDocument.id)
                                   .limit(limit).offset(offset)).all()
            return {"status": status, "total": total, "documents": [_summary(row) for row in rows]}

    def _row(self, session: Session, doc_id: str) -> ReviewDocument:
        row = session.get(ReviewDocument, doc_id)
        if row is None:
            raise NotFound(f"no filed document {doc_id}")
        return row

    def get(self, doc_id: str) -> dict[str, Any]:
        """A document's summary, the model's result and the reviewer's decisions so far."""
        with Session(self.engine) as session:
            row = self._row(session, doc_id)
            return {**_summary(row), "result": self.cipher.decrypt_json(row.result),
                    "decisions": [self._decision_out(d) for d in row.decisions]}

    def _decision_out(self, d: ReviewDecision) -> dict[str, Any]:
        return {"pointer": d.pointer, "action": d.action, "page": d.page,
                "value": None if d.value is None else self.cipher.decrypt_json(d.value),
                "decided_by": d.decided_by, "decided_at": d.decided_at.isoformat()}

    def page(self, doc_id: str, number: int) -> bytes:
        """Page ``number`` (from 1) of a filed document, as PNG."""
        with Session(self.engine) as session:
            page = session.get(ReviewPage, (doc_id, number))
            if page is None:
                self._row(session, doc_id)
                raise NotFound(f"document {doc_id} has no page {number}")
            return self.cipher.decrypt(page.png)

    def decide(self, doc_id: str, version: int, decisions: list[Decision], status: str,
               reviewer: str) -> dict[str, Any]:
        """Replace the document's decisions by ``decisions`` if it is still at ``version``;
        ``status`` "pending" keeps it open, "done" closes it (accepted or corrected, by the
        decisions), "rejected" sets the whole document aside (never exported). Raises
        :class:`NotFound`, :class:`Conflict`, or :class:`BadDecisions` (nothing written)."""
        if status not in ("pending", "done", "rejected"):
            raise BadDecisions("status is one of pending, done, rejected")
        now = _now()
        with Session(self.engine) as session, session.begin():
            row = self._row(session, doc_id)
            result = self.cipher.decrypt_json(row.result)
            check(decisions, result["structured"], row.page_count)
            corrected(result["structured"], result["items"], decisions)  # a record the schema accepts
            new_status = outcome(decisions) if status == "done" else status
            moved = session.execute(
                update(ReviewDocument).where(ReviewDocument.id == doc_id, ReviewDocument.version == version)
                .values(version=version + 1, status=new_status, updated_at=now, reviewed_by=reviewer)
                .execution_options(synchronize_session=False))
            if moved.rowcount != 1:
                session.refresh(row)
                raise Conflict(f"document {doc_id} is at version {row.version}, not {version}: it was saved by "
                               f"{row.reviewed_by or 'another reviewer'} since you read it; reload it and decide again")
            session.execute(delete(ReviewDecision).where(ReviewDecision.document_id == doc_id))
            session.add_all(ReviewDecision(
                document_id=doc_id, position=n, pointer=d.pointer, action=d.action, page=d.page,
                value=None if d.value is None else self.cipher.encrypt_json(d.value), decided_by=reviewer,
                decided_at=now) for n, d in enumerate(decisions))
        return self.get(doc_id)

    def corrected_record(self, doc_id: str, document: dict[str, Any] | None = None
                         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The record with the reviewer's decisions applied, and its items' pages (of ``document``,
        :meth:`get`'s answer, when the caller has it already)."""
        document = self.get(doc_id) if document is None else document
        decisions = [Decision(d["pointer"], d["action"], d["value"], d["page"]) for d in document["decisions"]]
        return corrected(document["result"]["structured"], document["result"]["items"], decisions)

    def export(self) -> Iterator[dict[str, Any]]:
        """One training row per page of every accepted or corrected document, oldest first: the
        page as PNG (base64) and the record of the items on that page, as the reviewer left it."""
        with Session(self.engine) as session:
            ids = session.scalars(select(ReviewDocument.id).where(ReviewDocument.status.in_(EXPORTED))
                                  .order_by(ReviewDocument.created_at, ReviewDocument.id)).all()
        for doc_id in ids:
            summary = self.get(doc_id)
            record, items = self.corrected_record(doc_id, summary)
            for number, page_record in enumerate(page_records(record, items, summary["pages"]), start=1):
                png = self.page(doc_id, number)
                yield {"document_id": doc_id, "page": number, "pages": summary["pages"], "status": summary["status"],
                       "reviewed_at": summary["updated_at"], "document_sha256": summary["document_sha256"],
                       "page_sha256": hashlib.sha256(png).hexdigest(),
                       "image_png_base64": base64.b64encode(png).decode(), "record": page_record}
