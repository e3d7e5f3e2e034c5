#!/usr/bin/env python3
"""Grammar engines compared on this run's tokenizer and the extraction record's schema:
xgrammar (what medvl/grammar.py uses) against llguidance.

For each library: the tokenizer table's build time, the record schema's compile time, and the
time to compute one step's token mask, over the training answers of ``--answers`` synthetic
documents replayed token by token (the answer's own next token must be allowed at every step,
and the end token after it: a library that refuses a training answer is wrong for this
project, whatever its speed). Then, on the run's device, the time to apply the masks to a
``[rows, vocab]`` float32 logits tensor for 1 and 32 rows (xgrammar's kernel: Triton on a
GPU), the per-step cost a batch of grammar rows adds.

    python scripts/perf_grammar.py --profile 7b-random

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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from medvl.benchmark import summarize  # noqa: E402
from medvl.documents import KINDS, generate_document  # noqa: E402
from medvl.grammar import JSON_SEPARATORS  # noqa: E402
from medvl.io import atomic_write_json  # noqa: E402
from medvl.modeling import load_processor  # noqa: E402
from medvl.phase import log, run_tool  # noqa: E402
from medvl.records import RECORD_SCHEMA  # noqa: E402
from medvl.settings import Settings  # noqa: E402
from medvl.workdir import Workdir  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--answers", type=int, default=20, help="training answers replayed (default: %(default)s)")
    parser.add_argument("--out", default="", help="output JSON (default: benchmarks/perf_grammar.json)")


def microseconds(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"mean": 1e6 * statistics.mean(ordered), "p50": 1e6 * ordered[len(ordered) // 2],
            "p99": 1e6 * ordered[int(0.99 * (len(ordered) - 1))], "max": 1e6 * ordered[-1], "n": len(ordered)}


def replay(new_matcher, fill, accept, allowed, answers: list[list[int]], end: int) -> dict:
    """Mask before every token of every answer (and the end token), timing only the mask."""
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


def bit(mask: torch.Tensor, token: int) -> bool:
    return bool((int(mask[0, token // 32]) >> (token % 32)) & 1)


def measure_xgrammar(tokenizer, vocab: int, end: int, answers: list[list[int]]) -> dict:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[end])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = compiler.compile_json_schema(RECORD_SCHEMA, any_whitespace=False, separators=JSON_SEPARATORS)
    compile_s = time.perf_counter() - started
    mask = xgr.allocate_token_bitmask(1, vocab)
    result = replay(lambda: xgr.GrammarMatcher(grammar), lambda m: m.fill_next_token_bitmask(mask, 0),
                    lambda m, t: m.accept_token(t), lambda t: bit(mask, t), answers, end)
    return {"library": "xgrammar", "version": importlib.metadata.version("xgrammar"), "tokenizer_table_s": table_s,
            "record_schema_compile_s": compile_s, **result}


def measure_llguidance(tokenizer, vocab: int, end: int, answers: list[list[int]]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    started = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=end)
    table_s = time.perf_counter() - started
    started = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(RECORD_SCHEMA, defaults={
        "whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1]})
    error = llguidance.LLMatcher.validate_grammar(grammar, lltokenizer)
    compile_s = time.perf_counter() - started
    if error:
        return {"library": "llguidance", "error": error}
    mask = llt.allocate_token_bitmask(1, vocab)
    result = replay(lambda: llguidance.LLMatcher(lltokenizer, grammar), lambda m: llt.fill_next_token_bitmask(m, mask, 0),
                    lambda m, t: m.consume_token(t), lambda t: bit(mask, t), answers, end)
    return {"library": "llguidance", "version": importlib.metadata.version("llguidance"),
            "tokenizer_table_s": table_s, "record_schema_validate_s": compile_s, **result}


def apply_cost(vocab: int, device: torch.device, repeats: int = 50) -> dict:
    """Applying masks to logits on ``device``: copy the bitmask there and mask in place."""
    import xgrammar as xgr

    out = {}
    for rows in (1, 32):
        logits = torch.randn(rows, vocab, device=device)
        mask = xgr.allocate_token_bitmask(rows, vocab)
        if device.type == "cuda":
            mask = mask.pin_memory()
        times = []
        for i in range(repeats + 5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            xgr.apply_token_bitmask_inplace(logits, mask.to(device, non_blocking=True), vocab_size=vocab,
                                            indices=list(range(rows)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 5:  # the first calls compile the kernel
                times.append(time.perf_counter() - started)
        out[f"rows_{rows}"] = microseconds(times)
    return out


def main(settings: Settings, wd: Workdir, args: argparse.Namespace) -> dict:
    model_dir = wd.base_model_dir(settings)
    tokenizer = load_processor(model_dir, None).tokenizer
    config = json.loads((model_dir / "config.json").read_text())
    vocab = int(config.get("text_config", config).get("vocab_size") or config["vocab_size"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = [tokenizer(generate_document(i, KINDS[i % len(KINDS)]).target_answer(), add_special_tokens=False)["input_ids"]
               for i in range(args.answers)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {**settings.record(("model",)), "command": shlex.join(["python", *sys.argv]),
              "tokenizer_tokens": len(tokenizer), "model_vocab": vocab, "answers": len(answers),
              "answer_tokens": summarize([float(len(a)) for a in answers]),
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "libraries": [measure_xgrammar(tokenizer, vocab, end, answers),
                            measure_llguidance(tokenizer, vocab, end, answers)],
              "apply_masks_us": apply_cost(vocab, device)}
    for lib in report["libraries"]:
        log.info("%-10s mask mean %.1f us p50 %.1f us p99 %.1f us, %d steps, %d refused", lib["library"],
                 lib["mask_us"]["mean"], lib["mask_us"]["p50"], lib["mask_us"]["p99"], lib["steps"],
                 lib["tokens_refused"])
    log.info("apply masks on %s: %s", report["device"], {k: round(v["p50"], 1) for k, v in report["apply_masks_us"].items()})
    atomic_write_json(Path(args.out) if args.out else wd.bench("perf_grammar"), report)
    return report


if __name__ == "__main__":
    run_tool("perf_grammar", (2,), main, __doc__, add_arguments)
