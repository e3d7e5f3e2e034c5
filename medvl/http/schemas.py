"""Request and response bodies of every route (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medvl.engine.scheduler import MAX_TOP_LOGPROBS
from medvl.medical.records import ExtractionRecord


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelInfo(BaseModel):
    path: str
    kind: str  # finetuned, base, custom (a --model folder) or ocr (the OCR + rules baseline)
    form: str  # how the weights are served: bf16, awq, nf4 or int4 (medvl.model.forms); ocr for the baseline
    device: str


class FlagItem(BaseModel):
    rule: str
    item: str
    value: str
    reason: str
    severity: Literal["info", "warning", "error"]


class ItemSource(BaseModel):
    pointer: str = Field(description="the item in `structured`, as an RFC 6901 JSON pointer: /lab_values/0, "
                                     "/diagnoses/2, /vitals/heart_rate")
    page: int = Field(description="the page it was read from, from 1 (always 1 for an image)")
    confidence: float | None = Field(None, description="the probability the model gave its least sure field's "
                                                       "exact value (medvl/medical/confidence.py); null when not "
                                                       "read from the model's JSON (the OCR baseline, a repaired answer)")
    fields: dict[str, float] | None = Field(None, description="each non-empty field's confidence, for items with "
                                                              "fields (a medication's name, dose, ...)")
    boxes: dict[str, list[float] | None] | None = Field(
        None, description="each non-empty field's box on the item's page, [x0, y0, x1, y1] normalised to the page "
                          "(origin top left), from the page's OCR (a diagnosis's or a vital's under `value`); null: "
                          "the page does not show it (the item is in needs_review); absent with api.source_boxes off")


class PageAnswer(BaseModel):
    page: int
    parse_status: Literal["json", "repaired", "fallback", "ocr"]
    closed_early: bool
    usage: Usage


class ExtractResponse(BaseModel):
    request_id: str
    structured: ExtractionRecord = Field(description="the document's record: its pages' records merged in page "
                                                     "order, an item repeated exactly on a later page kept once")
    items: list[ItemSource] = Field(description="where each item of `structured` came from, and how sure the model was")
    needs_review: list[str] = Field(description="pointers of the items to check by hand: least sure first (confidence "
                                                "below api.review_below_confidence, or none), then those with a "
                                                "value not found on the page, most fields missing first")
    pages: list[PageAnswer] = Field(description="each page's answer: an image is one page, a PDF one per page")
    flags: list[FlagItem] = Field(description="plausibility and safety flags on the whole record "
                                              "(medvl/medical/flags.py), and vitals that differ between pages")
    disclaimer: str
    parse_status: Literal["json", "repaired", "fallback", "ocr"] = Field(
        description="json: the answer parsed as JSON (always, for answers decoded under the record's schema); "
                    "repaired: after fixing brackets/commas; fallback: no JSON - drugs and conditions found "
                    "in the raw text (the last two for free-text answers only); ocr: read by the OCR + rules "
                    "baseline (--model ocr; raw_text is its OCR lines). A document's is its worst page's.")
    closed_early: bool = Field(False, description="the token budget ran low and the answer was steered to close "
                                                  "its JSON (its last item may be shortened); on any page")
    raw_text: str = Field(description="the model's answer; a PDF's page answers in page order, each after a form "
                                      "feed (\\f) but the first")
    latency_s: float
    usage: Usage
    model: ModelInfo
    review_id: str | None = Field(None, description="the id the result was filed under for review (?review=true or "
                                                    "api.file_for_review; GET /review/{id}); null when not filed")


class PageText(BaseModel):
    page: int
    text: str


class AnalyzeResponse(BaseModel):
    request_id: str
    text: str = Field(description="the answer; for a PDF each page's answer under a 'Page N:' heading (the context "
                                  "holds one page, so every page is asked the question on its own)")
    pages: list[PageText]
    latency_s: float
    usage: Usage
    model: ModelInfo


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "error", "dead"]  # dead: the engine failed; the process exits shortly
    model_loaded: bool
    model_path: str
    weights: str  # the served form: bf16, awq, nf4 or int4 (medvl.model.forms); ocr for the OCR baseline
    device: str
    gpu_name: str | None
    gpu_memory_used_mb: float | None
    gpu_memory_peak_mb: float | None  # torch's high-water mark since start (weights, cache, activations)
    requests_running: int
    requests_waiting: int
    decoding: str = ""  # e.g. "continuous batching over 32 cache slots, compiled step, weights AWQ int4 (...)"
    startup_s: dict[str, float] = {}  # load (with int4 packing), decoder warm-up (compilation): once per start
    error: str | None = None
    # Fingerprint of the settings the answers depend on (medvl.core.settings.SERVED_SETTINGS): phase 8
    # checks it is its run's, so a --set override that never reached the server fails the phase.
    settings_hash: str = ""


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    param: str | None = None  # the request field at fault, where there is one (as OpenAI names it)


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# --------------------------------------------------------------------------- OpenAI chat


class ChatImageUrl(BaseModel):
    url: str


class ChatPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ChatImageUrl | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ChatPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat-completion request. Every field here is honoured, or refused with a 400
    naming it when set to something this server does not do (``n`` > 1, ``top_logprobs``
    without ``logprobs``, penalties); any other field is a 400 too."""

    model_config = ConfigDict(extra="forbid")

    model: str = "medvl"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 or absent: greedy")
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, description="with temperature > 0: the same seed gives the same answer")
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings; the answer ends before the first")
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="each generated token's log-probability")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="with logprobs: this many most likely tokens per position")
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="an end-user id; logged, not used")
    ignore_eos: bool = Field(default=False, description="vLLM's extension: always generate max_tokens tokens")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medvl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReviewSummary(BaseModel):
    """What a list shows of a filed document: nothing of the patient's."""

    id: str
    status: Literal["pending", "accepted", "corrected", "rejected"]
    version: int = Field(description="rises with every save; a save names the version it read (409 when it moved)")
    created_at: str
    updated_at: str
    document_sha256: str
    content_type: str
    pages: int
    items_to_review: int
    filed_by: str
    reviewed_by: str | None
    model_path: str
    model_form: str


class ReviewList(BaseModel):
    status: str
    total: int
    documents: list[ReviewSummary]


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pointer: str = Field(description="an item (/medications/0, /vitals/heart_rate) or a field (/medications/0/dose) "
                                     "of the filed record; for add, a list (/diagnoses) or a new vital")
    action: Literal["accept", "correct", "reject", "add"]
    value: Any = Field(None, description="correct and add: the right value (a string, or an item's fields)")
    page: int | None = Field(None, description="add: the page the item is on, from 1")


class DecisionOut(DecisionIn):
    model_config = ConfigDict(extra="forbid")

    decided_by: str
    decided_at: str


class ReviewDocumentOut(ReviewSummary):
    result: dict[str, Any] = Field(description="what /extract answered: structured, items (confidences, boxes), "
                                               "needs_review, flags")
    decisions: list[DecisionOut]


class ReviewSave(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(description="the version the reviewer read (GET /review/{id})")
    status: Literal["pending", "done", "rejected"] = Field(
        description="pending: save and keep it open; done: accepted (every decision an acceptance) or corrected; "
                    "rejected: the whole document set aside, never exported")
    decisions: list[DecisionIn] = Field(description="every decision on the document; replaces those saved before")
    reviewer: str | None = Field(None, pattern=r"^[A-Za-z0-9._@-]{1,64}$",
                                 description="who decided (else the API key's fingerprint)")
