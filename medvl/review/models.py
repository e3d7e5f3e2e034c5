"""The review store's tables (SQLAlchemy's declarative models; the schema itself is created and
changed only by the migrations in ``migrations/versions``, which a test keeps in step with these).

``review_documents``: one row per filed document. In the clear only what an operator needs to
find and audit it (status, version, times, the upload's SHA-256, page and item counts, who
filed it, the model); the model's result and every decided value are Fernet tokens
(:mod:`medvl.review.crypto`). ``version`` rises with every change: a reviewer's save names the
version it read, so of two reviewers saving the same document the second is refused (409)
instead of silently overwriting the first.

``review_pages``: the document's pages as the server read them (PNG, encrypted): what the
reviewer sees and what phase 5 trains on, rendered once, as the model saw them.

``review_decisions``: the reviewer's decisions on a document, one per item or field (see
:mod:`medvl.review.decisions`), replaced as a whole by each save.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

STATUSES = ("pending", "accepted", "corrected", "rejected")


class Base(DeclarativeBase):
    pass


class ReviewDocument(Base):
    __tablename__ = "review_documents"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    document_sha256: Mapped[str] = mapped_column(String(64), index=True)
    content_type: Mapped[str] = mapped_column(String(100))
    page_count: Mapped[int] = mapped_column(Integer)
    items_to_review: Mapped[int] = mapped_column(Integer)
    filed_by: Mapped[str] = mapped_column(String(64))
    reviewed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_id: Mapped[str] = mapped_column(String(128))
    model_path: Mapped[str] = mapped_column(String(500))
    model_form: Mapped[str] = mapped_column(String(32))
    result: Mapped[bytes] = mapped_column(LargeBinary)  # encrypted: structured, items, needs_review
    pages: Mapped[list[ReviewPage]] = relationship(
        back_populates="document", cascade="all, delete-orphan", order_by="ReviewPage.page")
    decisions: Mapped[list[ReviewDecision]] = relationship(
        back_populates="document", cascade="all, delete-orphan", order_by="ReviewDecision.position")


class ReviewPage(Base):
    __tablename__ = "review_pages"

    document_id: Mapped[str] = mapped_column(ForeignKey("review_documents.id", ondelete="CASCADE"),
                                             primary_key=True)
    page: Mapped[int] = mapped_column(Integer, primary_key=True)  # from 1
    png: Mapped[bytes] = mapped_column(LargeBinary)  # encrypted PNG
    document: Mapped[ReviewDocument] = relationship(back_populates="pages")


class ReviewDecision(Base):
    __tablename__ = "review_decisions"

    document_id: Mapped[str] = mapped_column(ForeignKey("review_documents.id", ondelete="CASCADE"),
                                             primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # the order the reviewer gave
    pointer: Mapped[str] = mapped_column(String(300))
    action: Mapped[str] = mapped_column(String(16))
    page: Mapped[int | None] = mapped_column(Integer, nullable=True)
    value: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # encrypted JSON value
    decided_by: Mapped[str] = mapped_column(String(64))
    decided_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    document: Mapped[ReviewDocument] = relationship(back_populates="decisions")
