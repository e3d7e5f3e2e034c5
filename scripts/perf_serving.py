#!/usr/bin/env python3
"""Serving start-up and request latency of the API's engine: compilation is paid once.

Starts :class:`medvl.inference.InferenceEngine` exactly as ``api/server.py`` does on a GPU
(the bf16 base checkpoint quantized to torchao int4 at start-up unless --no-int4, fused
projections, the decoding step compiled for batch 1 and --max-batch before the engine says
ready), then sends the phase-3 documents one at a time and then all at once. Records the
start-up cost per stage, each request's latency and tokens, and how many graphs torch.compile
had compiled when the engine said ready and after the last request (equal: no request paid
for compilation).

    python scripts/perf_serving.py --profile 7b-random

Writes benchmarks/perf_serving.json. Needs a CUDA GPU, but for a smoke run with --no-int4.
"""

import argparse
import shlex
import sys
from concurrent.futures import wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from medvl.benchmark import ensure_benchmark_documents, summarize  # noqa: E402
from medvl.inference import GenerationRequest, InferenceEngine  # noqa: E402
from medvl.io import atomic_write_json  # noqa: E402
from medvl.phase import PhaseError, log, run_tool  # noqa: E402
from medvl.settings import Settings  # noqa: E402
from medvl.workdir import Workdir  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens per request (default: %(default)s)")
    parser.add_argument("--max-batch", type=int, default=8, help="the engine's largest batch (default: %(default)s)")
    parser.add_argument("--no-int4", action="store_true", help="serve the bf16 checkpoint as is")


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def result_row(request: GenerationRequest) -> dict:
    r = request.future.result()
    return {"latency_s": r.latency_s, "queue_s": r.queue_s, "batch_size": r.batch_size,
            "prompt_tokens": r.prompt_tokens, "generated_tokens": r.generated_tokens,
            "tokens_per_s": r.generated_tokens / max(r.latency_s - r.queue_s, 1e-9)}


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    if not cuda and not args.no_int4:
        raise PhaseError("int4 serving needs a CUDA GPU; on a CPU pass --no-int4 (a smoke run of the same engine)")
    samples = ensure_benchmark_documents(wd.test_images, settings.bench.document_seed, settings.bench.num_documents)
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    engine = InferenceEngine(wd.base_model_dir(settings), settings, max_batch_size=args.max_batch,
                             int4=not args.no_int4)
    engine.start()
    engine.wait_ready(timeout=1800)
    graphs_at_ready = compiled_graphs()
    log.info("engine ready: %s; start-up %s s; %d graphs compiled", engine.decoding,
             {k: round(v, 1) for k, v in engine.startup_s.items()}, graphs_at_ready)

    def send(picks: list[int]) -> list[GenerationRequest]:
        requests = [GenerationRequest(images[i], samples[i].prompt, args.new_tokens) for i in picks]
        for request in requests:
            engine.submit(request)
        wait([r.future for r in requests])
        return requests

    one_at_a_time = [result_row(send([i])[0]) for i in range(len(samples))]
    all_at_once = [result_row(r) for r in send(list(range(len(samples))))]
    engine.stop()
    report = {**settings.record(("model", "decode")), "command": shlex.join(["python", *sys.argv]),
              "gpu": torch.cuda.get_device_name(0) if cuda else None, "decoding": engine.decoding, "startup_s": engine.startup_s,
              "compile_s_per_batch_size": engine.decoder.compile_s if engine.decoder else None,
              "graphs_compiled_at_ready": graphs_at_ready, "graphs_compiled_after_requests": compiled_graphs(),
              "requests_one_at_a_time": one_at_a_time, "requests_all_at_once": all_at_once,
              "latency_s_one_at_a_time": summarize([r["latency_s"] for r in one_at_a_time]),
              "latency_s_all_at_once": summarize([r["latency_s"] for r in all_at_once]),
              "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
    atomic_write_json(wd.bench("perf_serving"), report)
    log.info("one at a time: %s", one_at_a_time)
    log.info("all at once: %s", all_at_once)
    log.info("graphs compiled at ready %d, after all requests %d", graphs_at_ready, report["graphs_compiled_after_requests"])
    return report


if __name__ == "__main__":
    run_tool("perf_serving", (2,), main, __doc__, add_arguments)
