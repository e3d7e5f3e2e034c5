"""Real-scale performance: the seed's plain paths against the project's, in one run.

Absolute speeds move between machines of the same kind (per-step CPU overhead dominates
plain decoding), so every claim here is a ratio measured in the same process: baseline and
project side by side, on the same weights, documents and batch sizes.

- :func:`inference_report`: plain ``generate`` (bf16, and bitsandbytes NF4 as the seed
  would serve 4-bit) against :class:`medvl.engine.slot_cache.SlotDecoder` (bf16, and torchao int4),
  at batch 1 and 8: TTFT, decode tokens/s, end-to-end latency, peak memory, the compile
  cost, the share of the memory-bandwidth floor reached, and a logits check against plain
  generate on the same weights.
- :func:`training_report`: plain PEFT QLoRA (``prepare_model_for_kbit_training``, full
  causal-LM loss) against :func:`medvl.training.trainer.load_for_training` +
  :func:`medvl.training.trainer.answer_only_loss`, at growing batch sizes until memory runs out.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from medvl.core.settings import Settings
from medvl.core.stats import summarize
from medvl.evaluation.benchmark import BenchSample
from medvl.model.compare import build_inputs, relative_l2
from medvl.model.memory import free_memory, tensor_bytes

log = logging.getLogger(__name__)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(StoppingCriteria):
    """Records when each decoding step finishes; never stops generation."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.first is None:
            sync()
            self.first = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- the machine


def copy_bandwidth_gbs(gib: int = 2, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(gib * 2**30 // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    free_memory()
    return 2 * gib * 2**30 * repeats / seconds / 1e9


def decode_bytes_per_token(model: Any, context: int, batch: int) -> int:
    """Bytes one decoding step must read: language-model layers, final norm, lm_head, and the
    KV cache at ``context`` tokens for ``batch`` rows (the vision tower and the embedding
    table, of which one row is read, are not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.model.language_model
    weights = sum(tensor_bytes(p) for p in text.layers.parameters()) + sum(tensor_bytes(p) for p in text.norm.parameters())
    weights += sum(tensor_bytes(p) for p in base.lm_head.parameters())
    cfg = base.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * batch * 2
    return weights + kv


def matmul_only_step_ms(model: Any, replays: int = 20) -> float:
    """Time of the weight matmuls alone for one batch-1 decoding step, on this GPU.

    Layer 0's projections (as the decoder runs them: fused, if it fused them) run once per
    layer (each weight is far larger than L2, so reusing it measures memory, not cache), then
    lm_head, captured as one CUDA graph so no launch gaps count. This is the ceiling the matmul
    library allows: a decoding step cannot beat it without faster matmul kernels, whatever
    happens around them.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    text = base.model.language_model
    linears = [m for m in text.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    device = base.lm_head.weight.device
    inputs = {m: torch.randn(1, m.in_features, dtype=torch.bfloat16, device=device) for m in [*linears, base.lm_head]}

    def step() -> None:
        for _ in range(len(text.layers)):
            for module in linears:
                module(inputs[module])
        base.lm_head(inputs[base.lm_head])

    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


# --------------------------------------------------------------------------- inference


def _fixed_length_config(model: Any, max_new_tokens: int, keep_logits: bool) -> Any:
    """Greedy, exactly ``max_new_tokens`` (random weights may emit EOS at any step)."""
    config = copy.deepcopy(model.generation_config)
    config.return_dict_in_generate = True
    config.output_logits = keep_logits
    config.do_sample = False
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.eos_token_id = None
    config.temperature = config.top_p = config.top_k = None
    return config


def plain_generate(model: Any, inputs: Any, max_new_tokens: int, keep_logits: bool = False) -> dict[str, Any]:
    """The seed's path: ``model.generate`` with the default dynamic cache, timed."""
    clock = StepClock()
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=_fixed_length_config(model, max_new_tokens, keep_logits),
                             stopping_criteria=[clock])
    sync()
    latency = time.perf_counter() - start
    width = inputs["input_ids"].shape[1]
    return {"latency_s": latency, "ttft_s": (clock.first or start) - start,
            "tokens": out.sequences[:, width:].cpu(),
            "logits": [t.float() for t in out.logits] if keep_logits else None}


def project_generate(decoder: Any, inputs: Any, max_new_tokens: int, keep_logits: bool = False) -> dict[str, Any]:
    """The project's path: the static-cache decoder, same inputs and token count."""
    result = decoder.generate(inputs, max_new_tokens, stop_at_eos=False, keep_logits=keep_logits)
    return {"latency_s": result.latency_s, "ttft_s": result.ttft_s,
            "tokens": torch.tensor(result.sequences), "logits": result.step_logits}


def time_runs(run: Callable[[Any], dict[str, Any]], batches: list[Any], max_new_tokens: int,
              bytes_per_token: Callable[[int], int], bandwidth_gbs: float) -> dict[str, Any]:
    """Warm up once, run every batch, and summarise speed against the bandwidth floor."""
    run(batches[0])
    torch.cuda.reset_peak_memory_stats()
    rows = []
    for inputs in batches:
        r = run(inputs)
        decode_s = r["latency_s"] - r["ttft_s"]
        rows.append({"latency_s": r["latency_s"], "ttft_s": r["ttft_s"],
                     "decode_tokens_per_s": (max_new_tokens - 1) / decode_s,
                     "prompt_tokens": int(inputs["input_ids"].shape[1])})
    batch = int(batches[0]["input_ids"].shape[0])
    decode = summarize([r["decode_tokens_per_s"] for r in rows])
    context = int(sum(r["prompt_tokens"] for r in rows) / len(rows)) + max_new_tokens // 2
    floor = bandwidth_gbs * 1e9 / bytes_per_token(context)
    return {
        "batch_size": batch,
        "runs": len(rows),
        "new_tokens_per_row": max_new_tokens,
        "ttft_s": summarize([r["ttft_s"] for r in rows]),
        "latency_s": summarize([r["latency_s"] for r in rows]),
        "decode_tokens_per_s_per_row": decode,
        "decode_tokens_per_s_all_rows": decode["p50"] * batch,
        "bandwidth_floor_steps_per_s": floor,
        "fraction_of_bandwidth_floor": decode["p50"] / floor,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def compare_logits(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Next-token logits of the candidate against plain generate's, while their tokens agree.

    Greedy paths diverge for good at the first flipped token, so steps are compared up to and
    including the first disagreement; at that step the reference's top-2 gap says whether the
    flip was a near-tie (random weights have many: gaps of 0 are common in bf16).
    """
    ref_tokens, cand_tokens = reference["tokens"][0], candidate["tokens"][0]
    errors, flip = [], None
    for step, (ref, cand) in enumerate(zip(reference["logits"], candidate["logits"], strict=True)):
        errors.append(relative_l2(cand[0], ref[0]))
        if int(ref_tokens[step]) != int(cand_tokens[step]):
            top2 = ref[0].float().topk(2).values
            flip = {"step": step, "reference_top2_gap": float(top2[0] - top2[1]),
                    "max_abs_error_at_step": float((cand[0].float() - ref[0].float()).abs().max())}
            break
    return {"steps_compared": len(errors), "relative_errors": errors, "max_relative_error": max(errors),
            "first_token_flip": flip, "tokens_identical": flip is None}


def teacher_forced_logits(model: Any, inputs: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Next-token logits of ``model`` at each step of a given answer, in one forward pass."""
    extra = tokens[:-1].view(1, -1).to(inputs["input_ids"].device)
    ones = torch.ones_like(extra)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in full:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    start = inputs["input_ids"].shape[1] - 1
    with torch.inference_mode():
        logits = model(**full, use_cache=False).logits[0, start:]
    return [row.float().cpu() for row in logits]


def bf16_noise_check(fp32_model: Any, inputs: Any, plain: dict[str, Any], project: dict[str, Any],
                     agreement: dict[str, Any]) -> dict[str, Any]:
    """How far each bf16 path is from a float32 run of the same weights, on the same tokens.

    This is the yardstick for "within bf16 tolerance": plain generate's own distance from
    float32 is what bf16 arithmetic costs; the project's path should be no farther (compared
    over the steps where both paths produced the same tokens, i.e. saw the same context).
    """
    reference = teacher_forced_logits(fp32_model, inputs, plain["tokens"][0])
    steps = agreement["steps_compared"] - (1 if agreement["first_token_flip"] else 0) or 1
    plain_errors = [relative_l2(plain["logits"][s][0], reference[s]) for s in range(steps)]
    project_errors = [relative_l2(project["logits"][s][0], reference[s]) for s in range(steps)]
    return {"steps": steps, "plain_vs_fp32_max": max(plain_errors), "project_vs_fp32_max": max(project_errors),
            "plain_vs_fp32": plain_errors, "project_vs_fp32": project_errors}


def make_batches(processor: Any, samples: list[BenchSample], batch_size: int, device: torch.device,
                 count: int) -> list[Any]:
    """``count`` batches of ``batch_size`` documents each (documents reused in turn)."""
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    batches = []
    for b in range(count):
        picks = [(b * batch_size + i) % len(samples) for i in range(batch_size)]
        batches.append(build_inputs(processor, [images[i] for i in picks], [samples[i].prompt for i in picks], device))
    return batches


LOGIT_CHECK_STEPS = 32


def profile_decode(decoder: Any, inputs: Any, max_new_tokens: int, rows: int = 20) -> list[str]:
    """The GPU kernels of one answer by total time (a text table): where a decoding step's
    time goes beyond the weight matmuls. The prompt's kernels are included (one forward)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decoder.generate(inputs, max_new_tokens, stop_at_eos=False)
            torch.cuda.synchronize()
    except RuntimeError as exc:  # profiling CUDA graphs is not supported everywhere: say so
        return [f"profiling failed: {type(exc).__name__}: {exc}"[:300]]
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows).splitlines()


def _brief(run: dict[str, Any]) -> str:
    return (f"decode {run['decode_tokens_per_s_per_row']['p50']:.1f} tok/s per row, TTFT {run['ttft_s']['p50']:.3f} s, "
            f"{100 * run['fraction_of_bandwidth_floor']:.0f}% of the bandwidth floor, peak {run['peak_memory_gb']:.1f} GB")


def measure_variant(label: str, model: Any, processor: Any, samples: list[BenchSample], settings: Settings,
                    bandwidth_gbs: float, max_new_tokens: int, batch_sizes: tuple[int, ...],
                    project: bool, baseline: bool, fp32_reference: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Baseline (plain generate) and/or project (static decoder) on one loaded model; with
    ``fp32_reference`` (a loader) the logits are also compared with a float32 run."""
    from medvl.engine.slot_cache import SlotDecoder

    device = model.get_input_embeddings().weight.device
    record: dict[str, Any] = {"label": label, "weights_gb": sum(tensor_bytes(p) for p in model.parameters()) / 1e9}
    batches = {b: make_batches(processor, samples, b, device, count=3 if b == 1 else 2) for b in batch_sizes}

    def per_token(batch: int) -> Callable[[int], int]:
        return lambda context: decode_bytes_per_token(model, context, batch)

    if baseline:
        record["plain_generate"] = {}
        for b in batch_sizes:
            record["plain_generate"][f"batch_{b}"] = time_runs(lambda x: plain_generate(model, x, max_new_tokens),
                                                               batches[b], max_new_tokens, per_token(b), bandwidth_gbs)
            log.info("%s plain generate, batch %d: %s", label, b, _brief(record["plain_generate"][f"batch_{b}"]))
    # Plain generate's logits for the check, before the decoder fuses the model's projections.
    plain_runs = [plain_generate(model, inputs, LOGIT_CHECK_STEPS, keep_logits=True)
                  for inputs in batches[1][:2]] if project else []
    if project:
        longest = max(int(x["input_ids"].shape[1]) for bs in batches.values() for x in bs)
        decoder = SlotDecoder(model, max_cache_len=max(settings.decode.max_cache_len, longest + max_new_tokens),
                              slots=max(batch_sizes), compile_step=True)
        record["fused_layers"] = decoder.fused_layers
        try:  # on the decoder's (fused) weights
            record["matmul_only_step_ms"] = matmul_only_step_ms(model)
            record["matmul_only_tokens_per_s"] = 1000 / record["matmul_only_step_ms"]
            log.info("%s: weight matmuls alone take %.2f ms per batch-1 step (%.0f tokens/s ceiling)", label,
                     record["matmul_only_step_ms"], record["matmul_only_tokens_per_s"])
        except RuntimeError as exc:  # a kernel that cannot be captured: say so, measure the rest
            record["matmul_only_error"] = f"{type(exc).__name__}: {exc}"[:300]
            record["matmul_only_tokens_per_s"] = float("nan")
        log.info("%s: compiling the decoding step for batch sizes %s", label, batch_sizes)
        record["compile_s_per_batch_size"] = decoder.warm_up(decoder.prompt_row(batches[1][0]))
        record["static_decoder"] = {}
        for b in batch_sizes:
            record["static_decoder"][f"batch_{b}"] = time_runs(lambda x: project_generate(decoder, x, max_new_tokens),
                                                               batches[b], max_new_tokens, per_token(b), bandwidth_gbs)
            log.info("%s static decoder, batch %d: %s", label, b, _brief(record["static_decoder"][f"batch_{b}"]))
        record["kernels_batch_1"] = profile_decode(decoder, batches[1][0], max_new_tokens)
        log.info("%s: GPU kernels of one batch-1 answer (prompt included):\n%s", label,
                 "\n".join(record["kernels_batch_1"]))
        record["logits_check_vs_plain_generate"] = []
        runs = []
        for inputs, plain in zip(batches[1][:2], plain_runs, strict=True):
            mine = project_generate(decoder, inputs, LOGIT_CHECK_STEPS, keep_logits=True)
            runs.append((inputs, plain, mine))
            record["logits_check_vs_plain_generate"].append(compare_logits(plain, mine))
            log.info("%s logits check: %s", label, {k: v for k, v in record["logits_check_vs_plain_generate"][-1].items()
                                                    if k != "relative_errors"})
        del decoder
        if fp32_reference is not None:
            reference_model = fp32_reference()
            record["fp32_yardstick"] = [bf16_noise_check(reference_model, inputs, plain, mine, check)
                                        for (inputs, plain, mine), check in zip(runs, record["logits_check_vs_plain_generate"],
                                                                                strict=True)]
            log.info("%s against float32: %s", label, [{k: v for k, v in c.items() if k.endswith("max")}
                                                       for c in record["fp32_yardstick"]])
            del reference_model
    free_memory()
    return record


INFERENCE_VARIANTS = ("bf16", "int4_torchao", "awq_int4", "nf4_bitsandbytes")


def inference_report(model_dir: Path, settings: Settings, samples: list[BenchSample],
                     max_new_tokens: int = 128, batch_sizes: tuple[int, ...] = (1, 8),
                     variants: tuple[str, ...] = INFERENCE_VARIANTS, awq_dir: Path | None = None,
                     save: Callable[[dict[str, Any]], None] = lambda report: None) -> dict[str, Any]:
    """NF4 plain (the seed's 4-bit), bf16 plain vs static decoder, round-to-nearest int4 and
    AWQ int4 (phase 4's checkpoint in ``awq_dir``) through the static decoder.

    ``save`` is called with the report after each variant, so a run cut short keeps what it measured.
    """
    from medvl.model.fusion import fuse_projections
    from medvl.model.int4 import int4_weight_only, load_awq_model
    from medvl.model.loading import load_model, load_processor

    processor = load_processor(model_dir, settings, padding_side="left")
    bandwidth = copy_bandwidth_gbs()
    log.info("device-to-device copy bandwidth: %.0f GB/s", bandwidth)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "copy_bandwidth_gbs": bandwidth,
                              "max_new_tokens": max_new_tokens, "batch_sizes": list(batch_sizes),
                              "documents": [s.doc_id for s in samples], "variants": {}}

    def measured(name: str, record: dict[str, Any]) -> None:
        report["variants"][name] = record
        report["summary"] = inference_summary(report)
        log.info("summary so far: %s", report["summary"])
        save(report)

    # The seed's 4-bit baseline first: the cheapest to measure, so a run cut short still has it.
    if "nf4_bitsandbytes" in variants:
        model = load_model(model_dir, settings, "nf4", dtype=torch.bfloat16, batched_vision=False)
        measured("nf4_bitsandbytes", measure_variant("nf4 (bitsandbytes)", model, processor, samples, settings,
                                                     bandwidth, max_new_tokens, batch_sizes, project=False,
                                                     baseline=True))
        del model
        free_memory()
    if "bf16" in variants or "int4_torchao" in variants:
        model = load_model(model_dir, settings, "none", dtype=torch.bfloat16)
        if "bf16" in variants:
            measured("bf16", measure_variant("bf16", model, processor, samples, settings, bandwidth,
                                             max_new_tokens, batch_sizes, project=True, baseline=True,
                                             fp32_reference=lambda: load_model(model_dir, settings, "none",
                                                                               dtype=torch.float32)))
        if "int4_torchao" in variants:
            started = time.perf_counter()
            fuse_projections(model)  # as the server does: the fused weights are quantized (a no-op after bf16)
            int4_weight_only(model)
            torch.cuda.synchronize()
            quantize_s = time.perf_counter() - started
            free_memory()
            record = measure_variant("int4 (round-to-nearest, W4A16 layers)", model, processor, samples, settings, bandwidth,
                                     max_new_tokens, batch_sizes, project=True, baseline=False)
            measured("int4_torchao", {**record, "quantize_s": quantize_s})
        del model
        free_memory()
    if "awq_int4" in variants:
        started = time.perf_counter()
        model = load_awq_model(awq_dir, settings)
        load_s = time.perf_counter() - started
        record = measure_variant("AWQ int4 (llm-compressor checkpoint, W4A16 layers)", model, processor, samples, settings,
                                 bandwidth, max_new_tokens, batch_sizes, project=True, baseline=False)
        measured("awq_int4", {**record, "load_s": load_s})
        del model
        free_memory()
    return report


def inference_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline figures at batch 1 from the variants measured so far: project over
    baseline, the share of the bandwidth floor and of the matmul-only ceiling, the logits verdicts."""
    v = report["variants"]

    def tok_s(variant: str, path: str) -> float:
        return v[variant][path]["batch_1"]["decode_tokens_per_s_per_row"]["p50"]

    summary: dict[str, Any] = {}
    if "bf16" in v:
        bf16 = tok_s("bf16", "static_decoder")
        yardstick = v["bf16"]["fp32_yardstick"]
        summary.update({
            "bf16_plain_generate_tok_s": tok_s("bf16", "plain_generate"),
            "bf16_static_decoder_tok_s": bf16,
            "bf16_speedup": bf16 / tok_s("bf16", "plain_generate"),
            "bf16_fraction_of_bandwidth_floor": v["bf16"]["static_decoder"]["batch_1"]["fraction_of_bandwidth_floor"],
            "bf16_matmul_only_ceiling_tok_s": v["bf16"]["matmul_only_tokens_per_s"],
            "bf16_fraction_of_matmul_ceiling": bf16 / v["bf16"]["matmul_only_tokens_per_s"],
            # Within bf16 tolerance: no farther from float32 than plain generate is (x1.5 slack).
            "bf16_noise_plain_vs_fp32": max(c["plain_vs_fp32_max"] for c in yardstick),
            "bf16_project_vs_fp32_max": max(c["project_vs_fp32_max"] for c in yardstick),
            "bf16_logits_within_tolerance": all(c["project_vs_fp32_max"] <= 1.5 * c["plain_vs_fp32_max"]
                                                for c in yardstick),
        })
    if "int4_torchao" in v:
        int4 = v["int4_torchao"]
        summary["int4_static_decoder_tok_s"] = tok_s("int4_torchao", "static_decoder")
        summary["int4_matmul_only_ceiling_tok_s"] = int4["matmul_only_tokens_per_s"]
        # int4 against plain generate on the same int4 weights, within the bf16 noise above (x1.5).
        summary["int4_project_vs_plain_max"] = max(c["max_relative_error"] for c in int4["logits_check_vs_plain_generate"])
        if "bf16" in v:
            summary["int4_logits_within_tolerance"] = (summary["int4_project_vs_plain_max"]
                                                       <= 1.5 * summary["bf16_noise_plain_vs_fp32"])
    if "awq_int4" in v:
        summary["awq_static_decoder_tok_s"] = tok_s("awq_int4", "static_decoder")
        summary["awq_weights_gb"] = v["awq_int4"]["weights_gb"]
        summary["awq_project_vs_plain_max"] = max(c["max_relative_error"]
                                                  for c in v["awq_int4"]["logits_check_vs_plain_generate"])
    if "nf4_bitsandbytes" in v:
        summary["nf4_plain_generate_tok_s"] = tok_s("nf4_bitsandbytes", "plain_generate")
        if "int4_torchao" in v:
            summary["int4_speedup_over_nf4_plain"] = summary["int4_static_decoder_tok_s"] / summary["nf4_plain_generate_tok_s"]
    return summary


# --------------------------------------------------------------------------- training


def load_plain_peft(model_dir: Path, settings: Settings) -> Any:
    """What a plain PEFT QLoRA script does: NF4 load, ``prepare_model_for_kbit_training``
    (float32 upcast of every non-quantized weight, gradient checkpointing with its defaults),
    then LoRA on the same modules as the project's path (same trainable parameters)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from medvl.model.loading import load_model
    from medvl.training.trainer import lora_config

    model = load_model(model_dir, settings, "nf4", dtype=torch.bfloat16, batched_vision=False)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model)
    return get_peft_model(model, lora_config(settings))


def _plain_loss(model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return model(**batch, labels=labels).loss


def _project_loss(model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    from medvl.training.trainer import answer_only_loss

    return answer_only_loss(model, batch, labels)[0]


def time_training(model: Any, loss_fn: Callable[..., torch.Tensor], batches: list[dict[str, torch.Tensor]],
                  warmup: int) -> dict[str, Any]:
    """Optimizer steps under bf16 autocast (as the Trainer runs them); the first ``warmup`` untimed."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    losses, tokens, started = [], 0, 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            started = time.perf_counter()
        batch = {k: v.to("cuda") for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if i >= warmup:  # real tokens: a padded batch's mask, a packed row's length (it has no padding)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    steps = len(batches) - warmup
    del optimizer
    return {"batch_size": samples_in(batches[0]), "steps_timed": steps, "seconds_per_step": seconds / steps, "tokens_per_s": tokens / seconds,
            "tokens_per_step": tokens / steps, "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
            "first_loss": losses[0], "losses": losses}


def samples_in(batch: dict[str, torch.Tensor]) -> int:
    """Samples in a batch: its rows, or in a packed row (train.pack_samples) its restarts of the
    text positions."""
    if "position_ids" in batch:
        return int((batch["position_ids"][0] == 0).sum())
    return len(batch["input_ids"])


def profile_step(model: Any, loss_fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor],
                 rows: int = 12) -> list[str]:
    """One profiled training step: the operators that took the most GPU time (a text table)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _forward_backward(model, loss_fn, batch)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows).splitlines()


def _forward_backward(model: Any, loss_fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
    """One training forward and backward as the timed steps run it (train mode: dropout on,
    checkpointing active; bf16 autocast), waited for; the gradients are dropped after."""
    batch = {k: v.to("cuda") for k, v in batch.items()}
    labels = batch.pop("labels")
    model.train()
    torch.cuda.synchronize()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_fn(model, batch, labels)
    loss.backward()
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)


def python_profile_step(model: Any, loss_fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor],
                        rows: int = 25) -> list[str]:
    """One training step (forward, backward) under cProfile: where the host's time goes when
    the GPU waits on it (batch 1). Sorted by time spent in each function itself."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(_forward_backward, model, loss_fn, batch)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(rows)
    return [line for line in text.getvalue().splitlines() if line.strip()]


def training_report(model_dir: Path, data_dir: Path, settings: Settings,
                    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32), steps: int = 4, warmup: int = 2) -> dict[str, Any]:
    """Plain PEFT QLoRA vs the project's path at each batch size, until memory runs out."""
    import json

    from medvl.model.loading import load_processor
    from medvl.training.trainer import VisionChatCollator, check_trainable, load_for_training

    processor = load_processor(model_dir, settings, padding_side="right")
    rows = json.loads((data_dir / "train.json").read_text())
    padded = VisionChatCollator(processor, settings.train.max_length, data_dir, settings.train.pad_to_multiple_of)
    packed = VisionChatCollator(processor, settings.train.max_length, data_dir, pack=True)
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "max_length": settings.train.max_length,
                              "lora_r": settings.train.lora_r, "gradient_checkpointing": settings.train.gradient_checkpointing,
                              "optimizer": "torch AdamW on the LoRA weights (same for both paths)",
                              "autocast": "bf16", "paths": {}}
    no_checkpointing = copy.deepcopy(settings)
    no_checkpointing.train.gradient_checkpointing = False
    # The same samples in the same order on every path; "project_packed" packs each batch's
    # samples into one row (train.pack_samples), so its losses are comparable step by step.
    paths = {"plain_peft": (settings, load_plain_peft, _plain_loss, padded),
             "project": (settings, load_for_training, _project_loss, padded),
             "project_packed": (settings, load_for_training, _project_loss, packed)}
    if settings.train.gradient_checkpointing:  # the project's path with train.gradient_checkpointing=false too
        paths["project_no_checkpointing"] = (no_checkpointing, load_for_training, _project_loss, padded)
    for name, (path_settings, loader, loss_fn, collator) in paths.items():
        model = loader(model_dir, path_settings)
        record: dict[str, Any] = {"trainable": check_trainable(model), "batches": {}}
        record["profile_batch_1"] = profile_step(model, loss_fn, collator(rows[:1]))
        log.info("%s, one step at batch 1, by GPU time:\n%s", name, "\n".join(record["profile_batch_1"]))
        record["python_profile_batch_1"] = python_profile_step(model, loss_fn, collator(rows[:1]))
        log.info("%s, one step at batch 1, host time by function:\n%s", name,
                 "\n".join(record["python_profile_batch_1"]))
        for size in batch_sizes:
            torch.manual_seed(0)
            batches = [collator([rows[(i * size + j) % len(rows)] for j in range(size)]) for i in range(warmup + steps)]
            try:
                record["batches"][f"batch_{size}"] = time_training(model, loss_fn, batches, warmup)
            except torch.OutOfMemoryError:
                record["batches"][f"batch_{size}"] = {"out_of_memory": True}
                free_memory()
                break
            log.info("%s batch %d: %s", name, size, {k: v for k, v in record["batches"][f"batch_{size}"].items()
                                                     if k != "losses"})
            free_memory()
        report["paths"][name] = record
        del model
        free_memory()
    report["summary"] = training_summary(report)
    return report


def training_summary(report: dict[str, Any]) -> dict[str, Any]:
    """Per project path and batch size: speed-up over plain PEFT at that batch and the memory
    ratio. And, for the best plain run and for each plain batch size, the project's fastest
    configuration whose peak memory is no more (the effective batch stays equal through
    gradient accumulation, so this is the speed a user gets within the same memory)."""
    plain = report["paths"]["plain_peft"]["batches"]

    def ran(record: dict[str, Any]) -> bool:
        return bool(record) and not record.get("out_of_memory")

    summary: dict[str, Any] = {}
    project_runs = []
    for name, path in report["paths"].items():
        if name == "plain_peft":
            continue
        summary[name] = {key: {"speedup": mine["tokens_per_s"] / plain[key]["tokens_per_s"],
                               "peak_memory_ratio": mine["peak_memory_gb"] / plain[key]["peak_memory_gb"]}
                         for key, mine in path["batches"].items() if ran(mine) and ran(plain.get(key, {}))}
        project_runs += [(name, r) for r in path["batches"].values() if ran(r)]

    def fastest_within(plain_run: dict[str, Any]) -> dict[str, Any] | None:
        fits = [(name, r) for name, r in project_runs if r["peak_memory_gb"] <= plain_run["peak_memory_gb"]]
        if not fits:
            return None
        name, best = max(fits, key=lambda c: c[1]["tokens_per_s"])
        return {"path": name, "batch": best["batch_size"], "tokens_per_s": best["tokens_per_s"],
                "peak_memory_gb": best["peak_memory_gb"], "speedup": best["tokens_per_s"] / plain_run["tokens_per_s"],
                "plain_peak_memory_gb": plain_run["peak_memory_gb"]}

    best_plain = max((r for r in plain.values() if ran(r)), key=lambda r: r["tokens_per_s"])
    summary["best_plain"] = {"tokens_per_s": best_plain["tokens_per_s"], "peak_memory_gb": best_plain["peak_memory_gb"],
                             "batch": best_plain["batch_size"]}
    summary["best_project_within_that_memory"] = fastest_within(best_plain)
    summary["best_speedup_at_no_more_memory"] = (summary["best_project_within_that_memory"] or {}).get("speedup")
    summary["per_plain_batch_at_no_more_memory"] = {key: fastest_within(r) for key, r in plain.items() if ran(r)}
    return summary
