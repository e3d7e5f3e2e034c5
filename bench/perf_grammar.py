#!/usr/bin/env python3
"""What a grammar costs per decoding step, on this run's tokenizer.

Two measurements, each over the training answers of ``--answers`` synthetic documents replayed
token by token under the extraction record's schema (every answer token, and the end token
after it, must be allowed: a library that refuses a training answer is wrong here, whatever
its speed):

- the libraries: llguidance (what medvl/engine/grammar.py uses) against xgrammar, one mask at a
  time: tokenizer table build, schema compile, time per mask (xgrammar is not a dependency:
  ``pip install xgrammar==0.2.8`` to compare; without it its row says so);
- the engine's own path (:meth:`medvl.engine.grammar.Grammars.apply`): 1 and 32 rows masked
  together per step (parallel fill, copy to the device, masking kernel, padding columns),
  with and without the steering that closes JSON as a budget runs out.

The run's tokenizer is the model's: for 7b-random, Qwen2.5's own (151,665 tokens in 152,064
logit columns, as the real model), so the masks cost what they cost at full vocabulary; tiny's
is a small trained one and measures only the plumbing.

    python bench/perf_grammar.py --profile 7b-random

Writes benchmarks/perf_grammar.json (or --out). Runs on a CPU too.
"""

import argparse
import importlib.metadata
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from medvl.core.io import atomic_write_json
from medvl.core.settings import Settings
from medvl.core.stats import summarize
from medvl.core.workdir import Workdir
from medvl.engine.grammar import CLOSE_RESERVE, JSON_SEPARATORS, RECORD_FORMAT, Grammars
from medvl.medical.documents import KINDS, generate_document
from medvl.medical.records import RECORD_SCHEMA
from medvl.model.loading import load_processor
from medvl.pipeline.runner import log, run_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answers", type=int, default=32, help="training answers replayed (default: %(default)s)")
    parser.add_argument("--out", default="", help="output JSON (default: benchmarks/perf_grammar.json)")


def microseconds(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"mean": 1e6 * statistics.mean(ordered), "p50": 1e6 * ordered[len(ordered) // 2],
            "p99": 1e6 * ordered[int(0.99 * (len(ordered) - 1))], "max": 1e6 * ordered[-1], "n": len(ordered)}


def bit(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[0, token // 32]) >> (token % 32)) & 1)


def replay(new_matcher, fill, accept, allowed, answers: list[list[int]], end: int) -> dict:
    """One mask before every token of every answer (and the end token), timing only the mask."""
    times, refused = [], 0
    for tokens in answers:
        matcher = new_matcher()
        for token in [*tokens, end]:
            started = time.perf_counter()
            fill(matcher)
            times.append(time.perf_counter() - started)
            refused += not allowed(token)
            accept(matcher, token)
    return {"mask_us": microseconds(times), "steps": len(times), "tokens_refused": refused}


def measure_xgrammar(tokenizer, end: int, answers: list[list[int]]) -> dict:
    try:
        import xgrammar as xgr
    except ImportError:
        return {"library": "xgrammar", "error": "not installed (pip install xgrammar==0.2.8)"}

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[end])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = compiler.compile_json_schema(RECORD_SCHEMA, any_whitespace=False, separators=JSON_SEPARATORS)
    compile_s = time.perf_counter() - started
    mask = xgr.allocate_token_bitmask(1, len(tokenizer))
    result = replay(lambda: xgr.GrammarMatcher(grammar), lambda m: m.fill_next_token_bitmask(mask, 0),
                    lambda m, t: m.accept_token(t), lambda t: bit(mask, t), answers, end)
    return {"library": "xgrammar", "version": importlib.metadata.version("xgrammar"), "tokenizer_table_s": table_s,
            "record_schema_compile_s": compile_s, **result}


def measure_llguidance(tokenizer, end: int, answers: list[list[int]]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    started = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=end)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(RECORD_SCHEMA, defaults={
        "whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1]})
    error = llguidance.LLMatcher.validate_grammar(grammar, lltokenizer)
    compile_s = time.perf_counter() - started
    if error:
        return {"library": "llguidance", "error": error}
    mask = llt.allocate_token_bitmask(1, len(tokenizer))
    result = replay(lambda: llguidance.LLMatcher(lltokenizer, grammar), lambda m: llt.fill_next_token_bitmask(m, mask, 0),
                    lambda m, t: m.consume_token(t), lambda t: bit(mask, t), answers, end)
    return {"library": "llguidance", "version": importlib.metadata.version("llguidance"),
            "tokenizer_table_s": table_s, "record_schema_compile_s": compile_s, **result}


def engine_masks(tokenizer, logits_width: int, end: int, answers: list[list[int]], rows: int,
                 steering: bool, device: torch.device) -> dict:
    """:meth:`Grammars.apply` over ``rows`` answers replayed in lockstep: time per step (CUDA
    synchronised) while every row is inside its answer; with ``steering``, every row's mask is
    also narrowed as in its last CLOSE_RESERVE tokens (the rows still follow their answers)."""
    grammars = Grammars(tokenizer, logits_width, [end], device, rows)
    batch = answers[:rows]
    matchers = [grammars.row(RECORD_FORMAT) for _ in batch]
    logits = torch.zeros(rows, logits_width, device=device)
    left = CLOSE_RESERVE if steering else 10**6
    times = []
    for step in range(min(len(a) for a in batch)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        grammars.apply(logits, [(i, m, left) for i, m in enumerate(matchers)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # the first steps compile the masking kernel
            times.append(time.perf_counter() - started)
        for matcher, answer in zip(matchers, batch, strict=True):
            matcher.accept(answer[step])  # the answer's token: the states a real answer passes through
    return {"rows": rows, "steering": steering, "step_us": microseconds(times)}


def measure(name: str, tokenizer, logits_width: int, answers_text: list[str], device: torch.device) -> dict:
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers_text]
    out = {"tokenizer": name, "tokenizer_tokens": len(tokenizer), "logits_width": logits_width,
           "answer_tokens": summarize([float(len(a)) for a in answers]),
           "libraries": [measure_llguidance(tokenizer, end, answers), measure_xgrammar(tokenizer, end, answers)],
           "engine": [engine_masks(tokenizer, logits_width, end, answers, rows, steering, device)
                      for rows in (1, 32) for steering in (False, True)]}
    for lib in (lib for lib in out["libraries"] if "error" not in lib):
        log.info("%s: %-10s mask mean %.1f us p50 %.1f us p99 %.1f us over %d steps, %d refused", name, lib["library"],
                 lib["mask_us"]["mean"], lib["mask_us"]["p50"], lib["mask_us"]["p99"], lib["steps"], lib["tokens_refused"])
    for row in out["engine"]:
        log.info("%s: engine, %2d rows%s: %.0f us per step (p50)", name, row["rows"],
                 " steering" if row["steering"] else "", row["step_us"]["p50"])
    return out


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    model_dir = wd.base_model_dir(settings)
    config = json.loads((model_dir / "config.json").read_text())
    logits_width = int(config.get("text_config", config)["vocab_size"])
    answers = [generate_document(i, KINDS[i % len(KINDS)]).target_answer() for i in range(args.answers)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**settings.record(("model",)), "command": shlex.join(["python", *sys.argv]),
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "answers": len(answers), "results": []}
    report["results"].append(measure(settings.model.standin_tokenizer if settings.model.source == "standin" else "hub",
                                     load_processor(model_dir, None).tokenizer, logits_width, answers, device))
    atomic_write_json(Path(args.out) if args.out else wd.bench("perf_grammar"), report)
    return report


if __name__ == "__main__":
    run_tool("perf_grammar", (2,), main, __doc__, add_arguments)
