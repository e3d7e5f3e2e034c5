"""Gradio demo that talks to the medvl API over HTTP.

    python -m medvl.http.demo_ui --api-url http://127.0.0.1:8000 [--base-api-url URL] [--port 7860]

Tabs: Extraction (an image or a PDF -> its pages, the structured record with each item's page, or
the record as a FHIR R4B Bundle, + latency), Review (documents filed for review: the page with
each field's box, the items as an editable table, to review first; accept, correct or remove
each, save: the API's /review routes), Custom analysis (upload + prompt), Benchmarks (tables and
charts from /benchmark), and Base vs fine-tuned when a second API serving the base model is
given with --base-api-url (env MEDVL_BASE_API_URL).
"""

from __future__ import annotations

import argparse
import io
import mimetypes
import os
from collections import Counter
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import matplotlib
from PIL import Image, ImageDraw

from medvl.core.settings import ApiSettings
from medvl.engine.images import BadInput
from medvl.engine.pages import PageLimits, decode_pages
from medvl.medical.records import resolve_pointer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DESCRIPTION = """
**Medical document understanding with Qwen2.5-VL.** The model is Qwen2.5-VL-7B-Instruct
(or, on the `tiny` profile, an architecture-faithful stand-in with random weights),
QLoRA-fine-tuned on medical documents: NF4 base, LoRA (r=64 in the 7b profiles) on the language model only,
assistant-only loss, merged in full precision and, on the 7b profiles, quantized to AWQ int4 for
serving (the form the evaluation scored; the API's /health names the form served).
Flags and extractions are informational and not clinical advice.
"""


class ApiClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.timeout = timeout

    def _post(self, route: str, document_path: str, data: dict[str, str] | None = None) -> dict[str, Any]:
        if not document_path:
            return {"error": "upload a document (an image or a PDF) first"}
        with open(document_path, "rb") as handle:
            content_type = mimetypes.guess_type(document_path)[0] or "application/octet-stream"
            files = {"file": (Path(document_path).name, handle.read(), content_type)}
        try:
            response = httpx.post(f"{self.url}{route}", files=files, data=data, headers=self.headers,
                                  timeout=self.timeout)
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"API unreachable at {self.url}: {exc}"}

    def extract(self, document_path: str, output: str = "record") -> dict[str, Any]:
        """The record (``output`` "record") or the FHIR Bundle ("fhir") of an image or a PDF."""
        return self._post(f"/extract?format={output}", document_path)

    def analyze(self, document_path: str, prompt: str) -> dict[str, Any]:
        return self._post("/analyze", document_path, {"prompt": prompt})

    def _json(self, method: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            response = httpx.request(method, f"{self.url}{route}", json=body, headers=self.headers, timeout=60)
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"API unreachable at {self.url}: {exc}"}

    def review_list(self, status: str = "pending") -> dict[str, Any]:
        return self._json("GET", f"/review?status={status}&limit=200")

    def review_document(self, doc_id: str) -> dict[str, Any]:
        return self._json("GET", f"/review/{doc_id}")

    def review_page(self, doc_id: str, page: int) -> Image.Image | None:
        try:
            response = httpx.get(f"{self.url}/review/{doc_id}/pages/{page}", headers=self.headers, timeout=60)
            response.raise_for_status()
            return Image.open(io.BytesIO(response.content))
        except (httpx.HTTPError, OSError):
            return None

    def review_save(self, doc_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("PUT", f"/review/{doc_id}", body)

    def benchmarks(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.url}/benchmark", headers=self.headers, timeout=30).json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"API unreachable at {self.url}: {exc}"}


def document_pages(document_path: str | None) -> list[Image.Image]:
    """The uploaded document's pages to show (a PDF rendered as the server renders it with the
    default api settings); none for a file that cannot be read: the API's answer then says why."""
    if not document_path:
        return []
    try:
        return decode_pages(Path(document_path).read_bytes(), PageLimits.from_settings(ApiSettings()))
    except (BadInput, OSError):
        return []


ITEM_HEADERS = ["review", "page", "item", "value", "confidence", "on the page"]


def item_rows(body: dict[str, Any]) -> list[list[Any]]:
    """One row per extracted item, the items to review first (least sure first), then the rest
    by page: its page, where it sits in the record, what it says, its confidence and whether
    each field was found on the page."""
    rows = []
    record = body.get("structured") or {}
    review = body.get("needs_review") or []
    for item in body.get("items") or []:
        value = resolve_pointer(record, item["pointer"])
        if isinstance(value, dict):
            value = " ".join(str(v) for v in value.values() if v)
        confidence = item.get("confidence")
        boxes = item.get("boxes")
        missing = [name for name, box in (boxes or {}).items() if box is None]
        found = "" if boxes is None else ("not found: " + ", ".join(missing) if missing else "found")
        rows.append(["review" if item["pointer"] in review else "", item["page"], item["pointer"], value,
                     None if confidence is None else round(confidence, 3), found])
    order = {pointer: i for i, pointer in enumerate(review)}
    return sorted(rows, key=lambda row: (order.get(row[2], len(order)), row[1]))


BOX_LEGEND = ("Boxes and confidences: **green** 0.8 and above, **amber** 0.5 to 0.8, **red** below 0.5, "
              "**grey** none (the OCR baseline gives none). A field the page does not show has no box; its "
              "item is listed for review.")


def confidence_colour(confidence: float | None) -> str:
    """Green from 0.8, amber from 0.5, red below; grey without a confidence."""
    if confidence is None:
        return "#8a8a8a"
    return "#2a9d5f" if confidence >= 0.8 else "#e0a020" if confidence >= 0.5 else "#c8352d"


def boxed_pages(pages: list[Image.Image], body: dict[str, Any]) -> list[Image.Image]:
    """The pages with each item's field boxes drawn, coloured by the item's confidence."""
    drawn = [page.convert("RGB") for page in pages]
    for item in body.get("items") or []:
        if not 0 < item["page"] <= len(drawn):
            continue
        page = drawn[item["page"] - 1]
        draw, (width, height) = ImageDraw.Draw(page), page.size
        for box in (item.get("boxes") or {}).values():
            if box is not None:
                x0, y0, x1, y1 = box
                draw.rectangle([x0 * width - 2, y0 * height - 2, x1 * width + 2, y1 * height + 2],
                               outline=confidence_colour(item.get("confidence")), width=3)
    return drawn


def extraction_view(body: dict[str, Any], pages: list[Image.Image] | None = None
                    ) -> tuple[dict[str, Any], list[list[Any]], str, list[Image.Image]]:
    """What the Extraction tab shows for an answer: the JSON, the items (the review list first),
    a summary line, and the pages with the items' boxes drawn."""
    pages = pages or []
    if body.get("resourceType") == "Bundle":
        kinds = Counter(entry["resource"]["resourceType"] for entry in body.get("entry", []))
        return body, [], "FHIR R4B Bundle: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())), pages
    if "latency_s" in body:
        count = len(body.get("pages") or [1])
        review = len(body.get("needs_review") or [])
        return body, item_rows(body), (f"latency **{body['latency_s']:.2f} s**, {count} page(s), "
                                       f"{body['usage']['completion_tokens']} tokens, {review} item(s) to review"), \
            boxed_pages(pages, body)
    return body, [], "", pages


REVIEW_HEADERS = ["review", "page", "item", "field", "read", "correct to", "remove"]
SAVE_AS = {"save, keep open": "pending", "done": "done", "reject the document": "rejected"}


def review_rows(result: dict[str, Any]) -> list[list[Any]]:
    """The filed record as the Review tab's editable table: one row per field of an item with
    fields (a medication's name, dose, ...), one per other item; the items to review first (as
    /extract lists them), then by page. "correct to" starts empty, "remove" unticked."""
    record, review = result.get("structured") or {}, result.get("needs_review") or []
    order = {pointer: i for i, pointer in enumerate(review)}
    items = sorted(result.get("items") or [], key=lambda item: (order.get(item["pointer"], len(order)), item["page"]))
    rows = []
    for item in items:
        value = resolve_pointer(record, item["pointer"])
        flag = "review" if item["pointer"] in review else ""
        fields = value.items() if isinstance(value, dict) else [("", value)]
        rows += [[flag, item["page"], item["pointer"], name, str(text), "", False] for name, text in fields]
    return rows


def _ticked(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "x")


def decisions_from_rows(rows: list[list[Any]]) -> list[dict[str, Any]]:
    """The reviewer's table as the API's decisions (medvl/review/decisions.py): a ticked "remove"
    rejects its item; a field or item given a new value is corrected; an item left as read is
    accepted. Worked example::

        /medications/0  dose  "50 mg"  correct to "500 mg"  -> correct /medications/0/dose "500 mg"
        /medications/0  name  "Metformin"  (unchanged)      -> (the item's other fields stand)
        /diagnoses/1    ""    "HTN"        remove ticked    -> reject /diagnoses/1
        /diagnoses/0    ""    "CKD 3b"     (unchanged)      -> accept /diagnoses/0
    """
    by_item: dict[str, list[list[Any]]] = {}
    for row in rows:
        by_item.setdefault(str(row[2]), []).append(row)
    decisions = []
    for pointer, item_rows in by_item.items():
        if any(_ticked(row[6]) for row in item_rows):
            decisions.append({"pointer": pointer, "action": "reject"})
            continue
        changed = [row for row in item_rows if str(row[5]).strip() and str(row[5]).strip() != str(row[4])]
        for row in changed:
            target = f"{pointer}/{row[3]}" if row[3] else pointer
            decisions.append({"pointer": target, "action": "correct", "value": str(row[5]).strip()})
        if not changed:
            decisions.append({"pointer": pointer, "action": "accept"})
    return decisions


def review_choices(listing: dict[str, Any]) -> list[tuple[str, str]]:
    """The pending documents as (label, id): when filed, pages, items to review."""
    return [(f"{d['created_at'][:19].replace('T', ' ')} | {d['pages']} page(s) | {d['items_to_review']} to review"
             f" | {d['id'][:8]}", d["id"]) for d in listing.get("documents") or []]


def stage_rows(bench: dict[str, Any]) -> list[list[Any]]:
    """One table row per benchmarked stage: memory, load time, latency, tokens/s."""
    rows = []
    for name, key in (("Baseline", "baseline_fp16"), ("INT4 quantized", "quantized_int4"),
                      ("Fine-tuned", "finetuned_standard_bench")):
        rec = bench.get(key)
        if not isinstance(rec, dict) or "aggregate" not in rec:
            rows.append([name, "not run", "", "", "", ""])
            continue
        after = rec["load"]["after_load"]
        memory = after.get("torch_allocated_mb", after.get("process_rss_mb"))
        agg = rec["aggregate"]
        rows.append([name, round(memory, 1), round(rec["load"]["load_time_s"], 2), round(agg["latency_s"]["p50"], 3),
                     round(agg["latency_s"]["p95"], 3), round(agg["tokens_per_s"]["avg"], 1)])
    return rows


def stage_chart(rows: list[list[Any]]):
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    done = [r for r in rows if r[1] != "not run"]
    names = [r[0] for r in done]
    left.bar(names, [r[1] for r in done], color="#164a8c")
    left.set_title("memory after load (MB)")
    right.bar(names, [r[3] for r in done], color="#c8553d")
    right.set_title("latency p50 (s)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    return fig


def build(api: ApiClient, base_api: ApiClient | None) -> gr.Blocks:
    with gr.Blocks(title="medvl - medical document understanding") as demo:
        gr.Markdown("# medvl: medical document understanding")
        gr.Markdown(DESCRIPTION)
        with gr.Tab("Extraction"):
            with gr.Row():
                with gr.Column(scale=2):
                    document = gr.File(label="document: an image or a PDF", file_types=["image", ".pdf"],
                                       type="filepath", elem_id="document")
                    output = gr.Radio([("record", "record"), ("FHIR R4B Bundle", "fhir")], value="record",
                                      label="answer as")
                    extract = gr.Button("Extract", variant="primary")
                    latency = gr.Markdown(elem_id="summary")
                    gr.Markdown(BOX_LEGEND)
                with gr.Column(scale=3):
                    # PNG, not Gradio's default WebP: a page of small print is read, not glanced at
                    pages = gr.Gallery(label="pages, each field's box coloured by its item's confidence",
                                       columns=1, height=640, object_fit="contain", format="png", elem_id="pages")
            items = gr.Dataframe(headers=ITEM_HEADERS, label="items: to review first, then by page",
                                 wrap=True, elem_id="items")
            with gr.Accordion("the whole answer (JSON)", open=False):
                result = gr.JSON(label="structured result")
            document.change(document_pages, inputs=document, outputs=pages)
            extract.click(lambda path, out: extraction_view(api.extract(path, out), document_pages(path)),
                          inputs=[document, output], outputs=[result, items, latency, pages])
        with gr.Tab("Review"):
            review_tab(api, demo)
        with gr.Tab("Custom analysis"):
            with gr.Row():
                image2 = gr.File(label="document: an image or a PDF", file_types=["image", ".pdf"], type="filepath")
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", value="Summarise the key clinical findings.")
                    answer = gr.Textbox(label="answer", lines=10)
            latency2 = gr.Markdown()
            gr.Button("Analyze", variant="primary").click(
                lambda path, text: _answer(api.analyze(path, text)), inputs=[image2, prompt], outputs=[answer, latency2])
        with gr.Tab("Benchmarks"):
            table = gr.Dataframe(headers=["stage", "memory MB", "load s", "p50 s", "p95 s", "tokens/s"],
                                 label="stage by stage")
            chart = gr.Plot(label="memory and latency")
            raw = gr.JSON(label="all benchmark files")

            def refresh():
                bench = api.benchmarks()
                rows = stage_rows(bench) if "error" not in bench else []
                return rows, stage_chart(rows) if rows else None, bench

            gr.Button("Refresh").click(refresh, outputs=[table, chart, raw])
            demo.load(refresh, outputs=[table, chart, raw])
        if base_api is not None:
            with gr.Tab("Base vs fine-tuned"):
                image3 = gr.File(label="document: an image or a PDF", file_types=["image", ".pdf"], type="filepath")
                with gr.Row():
                    base_out = gr.JSON(label="base model")
                    tuned_out = gr.JSON(label="fine-tuned model")
                gr.Button("Compare", variant="primary").click(
                    lambda path: (base_api.extract(path), api.extract(path)), inputs=image3,
                    outputs=[base_out, tuned_out])
    return demo


def review_tab(api: ApiClient, demo: gr.Blocks) -> None:
    """The Review tab: pick a pending document, see its pages with each field's box, correct the
    items in the table, save (the API refuses a save over another reviewer's with 409: reload)."""
    opened = gr.State({})
    with gr.Row():
        with gr.Column(scale=2):
            documents = gr.Dropdown(label="documents filed for review (pending)", choices=[], elem_id="review-docs")
            with gr.Row():
                refresh = gr.Button("Refresh list")
                open_button = gr.Button("Open", variant="primary")
            reviewer = gr.Textbox(label="reviewer (your name, kept with each decision)", elem_id="reviewer")
            save_as = gr.Radio(list(SAVE_AS), value="done", label="save as", elem_id="save-as")
            save = gr.Button("Save review", variant="primary")
            status = gr.Markdown(elem_id="review-status")
            gr.Markdown("Type the right value in **correct to**; tick **remove** for an item the page does not "
                        "show; items left as read are accepted. " + BOX_LEGEND)
        with gr.Column(scale=3):
            pages = gr.Gallery(label="the filed pages, each field's box coloured by its item's confidence", columns=1,
                               height=640, object_fit="contain", format="png", elem_id="review-pages")
    table = gr.Dataframe(headers=REVIEW_HEADERS, datatype=["str", "number", "str", "str", "str", "str", "bool"],
                         interactive=True, wrap=True, label="items: to review first", elem_id="review-items")

    def listed():
        listing = api.review_list()
        if "error" in listing:
            return gr.update(choices=[]), f"**{listing['error']}**"
        choices = review_choices(listing)
        return gr.update(choices=choices, value=choices[0][1] if choices else None), f"{listing['total']} pending"

    def load(doc_id: str | None):
        if not doc_id:
            return {}, [], [], "pick a document first"
        document = api.review_document(doc_id)
        if "error" in document:
            return {}, [], [], f"**{document['error']}**"
        shown = [api.review_page(doc_id, n) for n in range(1, document["pages"] + 1)]
        result = document["result"]
        return ({"id": doc_id, "version": document["version"]}, boxed_pages([p for p in shown if p], result),
                review_rows(result), f"version {document['version']}, {len(result.get('needs_review') or [])} "
                                     "item(s) to review")

    def saved(state: dict[str, Any], rows: Any, who: str, how: str):
        if not state:
            return state, "open a document first"
        values = rows.values.tolist() if hasattr(rows, "values") else rows
        body = {"version": state["version"], "status": SAVE_AS[how], "decisions": decisions_from_rows(values)}
        if who.strip():
            body["reviewer"] = who.strip()
        answer = api.review_save(state["id"], body)
        if "error" in answer:
            error = answer["error"]
            return state, f"**not saved**: {error.get('message', error) if isinstance(error, dict) else error}"
        return {**state, "version": answer["version"]}, (f"saved: **{answer['status']}**, version "
                                                         f"{answer['version']}, {len(answer['decisions'])} decision(s)")

    refresh.click(listed, outputs=[documents, status])
    demo.load(listed, outputs=[documents, status])
    open_button.click(load, inputs=documents, outputs=[opened, pages, table, status])
    save.click(saved, inputs=[opened, table, reviewer, save_as], outputs=[opened, status])


def _answer(body: dict[str, Any]) -> tuple[str, str]:
    if "text" in body:
        return body["text"], f"latency **{body['latency_s']:.2f} s**"
    return str(body.get("error", body)), ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("MEDVL_API_URL", "http://127.0.0.1:8000"),
                        help="the medvl API to call (env MEDVL_API_URL)")
    parser.add_argument("--base-api-url", default=os.environ.get("MEDVL_BASE_API_URL", ""),
                        help="a second API serving the base model, for the comparison tab (env MEDVL_BASE_API_URL)")
    parser.add_argument("--api-key", default=os.environ.get("MEDVL_API_KEY", ""),
                        help="sent as X-API-Key when the API requires one (env MEDVL_API_KEY)")
    parser.add_argument("--host", default=os.environ.get("MEDVL_UI_HOST", "127.0.0.1"),
                        help="address to listen on (env MEDVL_UI_HOST)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("MEDVL_UI_PORT", "7860")),
                        help="port to listen on (env MEDVL_UI_PORT)")
    args = parser.parse_args(argv)
    api = ApiClient(args.api_url, args.api_key or None)
    base = ApiClient(args.base_api_url, args.api_key or None) if args.base_api_url else None
    build(api, base).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
