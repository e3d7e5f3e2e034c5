"""The review store: filed documents, their pages and the reviewer's decisions.

Revision ID: 0001
Revises:
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "review_documents",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("document_sha256", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("page_count", sa.Integer, nullable=False),
        sa.Column("items_to_review", sa.Integer, nullable=False),
        sa.Column("filed_by", sa.String(64), nullable=False),
        sa.Column("reviewed_by", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("model_path", sa.String(500), nullable=False),
        sa.Column("model_form", sa.String(32), nullable=False),
        sa.Column("result", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_review_documents_status", "review_documents", ["status"])
    op.create_index("ix_review_documents_created_at", "review_documents", ["created_at"])
    op.create_index("ix_review_documents_document_sha256", "review_documents", ["document_sha256"])
    op.create_table(
        "review_pages",
        sa.Column("document_id", sa.String(32), sa.ForeignKey("review_documents.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("page", sa.Integer, primary_key=True),
        sa.Column("png", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "review_decisions",
        sa.Column("document_id", sa.String(32), sa.ForeignKey("review_documents.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("pointer", sa.String(300), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("page", sa.Integer, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=True),
        sa.Column("decided_by", sa.String(64), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("review_decisions")
    op.drop_table("review_pages")
    op.drop_table("review_documents")
