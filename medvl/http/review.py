"""The reviewer's routes: list filed documents, show one (its pages, the model's record with its
confidences and boxes, the decisions so far), save decisions, export the reviewed records as
training rows (medvl/review). Served when the server keeps a review store (``api.review_store``);
/extract files a result with ``?review=true`` or ``api.file_for_review``.

Each change writes an audit line naming the document, the pointers decided and the actions, the
status and version, and who (the reviewer's name or the API key's fingerprint); each read of a
document or page names the document (and page); never a value.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from medvl.http.errors import ERROR_RESPONSES, ApiError
from medvl.http.schemas import ExtractResponse, ReviewDocumentOut, ReviewList, ReviewSave
from medvl.http.state import ServerState, State
from medvl.review.decisions import BadDecisions, Decision
from medvl.review.errors import Conflict, NotFound

router = APIRouter(prefix="/review", tags=["review"])
# What /extract keeps of its answer for the reviewer (not the raw text, usage or latency).
FILED_FIELDS = {"structured", "items", "needs_review", "flags", "parse_status", "disclaimer"}


def store_of(state: ServerState) -> Any:
    if state.review is None:
        raise ApiError(404, "review_store_off", "this server keeps no review store: start it with "
                       "--set api.review_store=true and the key in MEDVL_REVIEW_KEY")
    return state.review


async def file_for_review(state: ServerState, http: Request, response: ExtractResponse, pages: list[Any],
                          content_type: str) -> str:
    """Keep an /extract answer and its pages for review; returns the id it is filed under."""
    store, audit = store_of(state), http.state.audit
    filed = await run_in_threadpool(
        store.file, pages=pages, document_sha256=audit.document_sha256 or "", content_type=content_type,
        result=response.model_dump(include=FILED_FIELDS), filed_by=audit.client, request_id=audit.request_id,
        model_path=str(state.served.model_dir), model_form=state.served.form)
    audit.review = {"action": "file", "document_id": filed["id"], "status": "pending", "version": 1}
    return filed["id"]


@router.get("", response_model=ReviewList, responses=ERROR_RESPONSES)
def list_documents(state: State, status: Literal["pending", "accepted", "corrected", "rejected"] = "pending",
                   limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0):
    """Filed documents of a status, oldest first, with how many there are."""
    return store_of(state).list(status, limit, offset)


@router.get("/export", responses={200: {"content": {"application/x-ndjson": {}}}, **ERROR_RESPONSES})
def export(http: Request, state: State):
    """One JSON line per page of every accepted or corrected document: the page (PNG, base64) and
    the record of its items as the reviewer left it (phase 5 reads it: ``data.reviewed_records``)."""
    import json

    store = store_of(state)
    audit = http.state.audit
    audit.review = {"action": "export", "rows": 0}

    def lines():
        for row in store.export():
            audit.review["rows"] += 1
            yield json.dumps(row, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/{doc_id}", response_model=ReviewDocumentOut, responses=ERROR_RESPONSES)
def show(http: Request, state: State, doc_id: str):
    """A filed document: the model's record, confidences and boxes, and the decisions so far."""
    http.state.audit.review = {"action": "read", "document_id": doc_id}
    try:
        return store_of(state).get(doc_id)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.get("/{doc_id}/pages/{page}", responses={200: {"content": {"image/png": {}}}, **ERROR_RESPONSES})
def page_image(http: Request, state: State, doc_id: str, page: int):
    """A filed document's page as the server read it (PNG)."""
    http.state.audit.review = {"action": "read_page", "document_id": doc_id, "page": page}
    try:
        return Response(store_of(state).page(doc_id, page), media_type="image/png",
                        headers={"Cache-Control": "no-store"})
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None


@router.put("/{doc_id}", response_model=ReviewDocumentOut, responses=ERROR_RESPONSES)
def save(http: Request, state: State, doc_id: str, body: ReviewSave):
    """Replace the document's decisions with these, if it is still at ``version`` (409 when another
    reviewer saved it since: reload and decide again); 422 naming every decision that does not fit."""
    store = store_of(state)
    audit = http.state.audit
    reviewer = body.reviewer or audit.client
    decisions = [Decision(d.pointer, d.action, d.value, d.page) for d in body.decisions]
    audit.review = {"action": "save", "document_id": doc_id, "reviewer": reviewer, "read_version": body.version,
                    "pointers": [d.pointer for d in decisions], "actions": [d.action for d in decisions]}
    try:
        saved = store.decide(doc_id, body.version, decisions, body.status, reviewer)
    except NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except Conflict as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except BadDecisions as exc:
        raise ApiError(422, "bad_decisions", str(exc)) from None
    audit.review.update(status=saved["status"], version=saved["version"])
    return saved
