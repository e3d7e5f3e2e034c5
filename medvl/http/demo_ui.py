"""Gradio demo that talks to the medvl API over HTTP.

    python -m medvl.http.demo_ui --api-url http://127.0.0.1:8000 [--base-api-url URL] [--port 7860]

Tabs: Extraction (upload -> structured record + latency), Custom analysis (upload + prompt),
Benchmarks (tables and charts from /benchmark), and Base vs fine-tuned when a second API
serving the base model is given with --base-api-url (env MEDVL_BASE_API_URL).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import matplotlib

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

    def _post(self, route: str, image_path: str, data: dict[str, str] | None = None) -> dict[str, Any]:
        if not image_path:
            return {"error": "upload an image first"}
        with open(image_path, "rb") as handle:
            files = {"file": (Path(image_path).name, handle.read(), "application/octet-stream")}
        try:
            response = httpx.post(f"{self.url}{route}", files=files, data=data, headers=self.headers,
                                  timeout=self.timeout)
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"API unreachable at {self.url}: {exc}"}

    def extract(self, image_path: str) -> dict[str, Any]:
        return self._post("/extract", image_path)

    def analyze(self, image_path: str, prompt: str) -> dict[str, Any]:
        return self._post("/analyze", image_path, {"prompt": prompt})

    def benchmarks(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.url}/benchmark", headers=self.headers, timeout=30).json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"API unreachable at {self.url}: {exc}"}


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
                image = gr.Image(type="filepath", label="document image")
                result = gr.JSON(label="structured result")
            latency = gr.Markdown()
            gr.Button("Extract", variant="primary").click(
                lambda path: _with_latency(api.extract(path)), inputs=image, outputs=[result, latency])
        with gr.Tab("Custom analysis"):
            with gr.Row():
                image2 = gr.Image(type="filepath", label="document image")
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
                image3 = gr.Image(type="filepath", label="document image")
                with gr.Row():
                    base_out = gr.JSON(label="base model")
                    tuned_out = gr.JSON(label="fine-tuned model")
                gr.Button("Compare", variant="primary").click(
                    lambda path: (base_api.extract(path), api.extract(path)), inputs=image3,
                    outputs=[base_out, tuned_out])
    return demo


def _with_latency(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    if "latency_s" in body:
        return body, f"latency **{body['latency_s']:.2f} s**, {body['usage']['completion_tokens']} tokens"
    return body, ""


def _answer(body: dict[str, Any]) -> tuple[str, str]:
    if "text" in body:
        return body["text"], f"latency **{body['latency_s']:.2f} s**"
    return str(body.get("error", body)), ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("MEDVL_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--base-api-url", default=os.environ.get("MEDVL_BASE_API_URL", ""))
    parser.add_argument("--api-key", default=os.environ.get("MEDVL_API_KEY", ""))
    parser.add_argument("--host", default=os.environ.get("MEDVL_UI_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("MEDVL_UI_PORT", "7860")))
    args = parser.parse_args(argv)
    api = ApiClient(args.api_url, args.api_key or None)
    base = ApiClient(args.base_api_url, args.api_key or None) if args.base_api_url else None
    build(api, base).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
