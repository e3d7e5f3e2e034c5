"""Typed settings: the one place every tunable lives.

A profile (``medvl/core/profiles/NAME.yaml``) fills these dataclasses; ``--set section.key=value``
overrides any field. Validation collects every problem (unknown keys, wrong types,
impossible values) and raises once, before any heavy work starts, so a typo in a long
command line costs seconds rather than a half-finished training run.

Each phase depends on some sections only; :meth:`Settings.fingerprint` hashes just those,
so changing the API port does not invalidate a trained adapter, while changing the LoRA rank
does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "tiny"
# Served forms made at load from a full-precision checkpoint (medvl.model.forms; bench.eval_also_forms).
LOAD_TIME_FORMS = ("int4", "fp8")


class SettingsError(ValueError):
    """Every problem found in a profile plus overrides, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  - " + "\n  - ".join(problems))


@dataclass
class ModelSettings:
    """Which model the pipeline works on and how images are budgeted."""

    hub_id: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    # "hub": snapshot_download(hub_id). "standin": build an architecture-faithful model offline.
    source: str = "standin"
    # For source=standin: "tiny" dimensions (CPU), "small" (a model that learns on one GPU in
    # minutes) or "7b" (the real 7B shapes, random weights).
    standin_architecture: str = "tiny"
    slug: str = "tiny-qwen25-vl"
    # The stand-in's tokenizer: "qwen2.5" (the real one, rebuilt offline from its rank file;
    # 7b-random) or "trained" (a small BPE trained on synthetic text; tiny, whose 128-wide
    # model 151k embedding rows would swamp).
    standin_tokenizer: str = "trained"
    # The vocabulary the "trained" tokenizer is trained to (refused with "qwen2.5").
    standin_tokenizer_vocab: int = 4096
    seed: int = 0
    # Pixel budget of the Qwen2-VL image processor; 28x28 pixels = one visual token.
    # The same numbers are saved with the adapter, so training and serving agree.
    min_pixels: int = 3136
    max_pixels: int = 200704
    require_cuda: bool = False
    # "auto": flash_attention_2 if installed on a GPU, else sdpa.
    attn_implementation: str = "auto"
    # Phase 2 pre-trains a stand-in's every weight for this many optimizer steps on reading a
    # page's text back (medvl/training/pretrain.py; never the record, on documents no later
    # phase sees), so that the base can copy text as the real base can read; 0 keeps it random.
    pretrain_steps: int = 0
    pretrain_documents: int = 2000
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 1e-3


@dataclass
class BenchSettings:
    """How every model variant is measured (phases 3, 4, 7, 8 share these)."""

    num_documents: int = 5
    max_new_tokens: int = 32
    warmup_runs: int = 1
    document_seed: int = 1234
    # Phase 7: answers must be complete to be scored, so they get their own token budget.
    eval_max_new_tokens: int = 400
    eval_test_samples: int = 100  # phase-5 test rows scored per model (0 = all)
    # Phase 7's cases asked at once (batched by the engine, as the server batches requests):
    # 1 times each case alone; more answers several times faster, each latency then measured
    # among that many.
    eval_concurrency: int = 1
    # Phase 7 also scores the fine-tuned model in these forms made at load from the merged
    # full-precision model (comma-separated: fp8, int4), each against that model with a paired
    # interval: what the form would cost if it were served. Empty: only the served form (and,
    # when it is 4-bit, full precision).
    eval_also_forms: str = ""

    def also_forms(self) -> list[str]:
        """``eval_also_forms`` as a list of form names."""
        return [f.strip() for f in self.eval_also_forms.split(",") if f.strip()]


@dataclass
class QuantSettings:
    """Phase 4: AWQ (llm-compressor) with the seed's settings, and the bitsandbytes NF4 fallback."""

    try_awq: bool = True
    awq_w_bit: int = 4
    awq_group_size: int = 128
    awq_zero_point: bool = True
    # Calibration pages: drawn from the synthetic training generator with seeds of their own
    # (never a phase-3 benchmark page or a phase-7 test/suite page); each is one rendered page
    # with a training prompt and its answer. llm-compressor's AWQ examples use 64-256.
    awq_calibration_samples: int = 64
    nf4_double_quant: bool = True
    # The served form (medvl/model/forms.py): true serves and evaluates the fine-tuned model merged in
    # full precision and then quantized with the 4-bit method phase 4 chose (AWQ int4 when it
    # succeeded, else NF4); phase 7 scores exactly that form and the server serves it by
    # default. The 7b profiles do; tiny does not: at width 128, 4-bit rounding of the merged
    # weights is as large as the LoRA deltas and wipes out what training learned (measured
    # with NF4), so tiny evaluates and serves both models in full precision.
    serve_quantized: bool = True


@dataclass
class DataSettings:
    """Phase 5: sources, limits, filters and the split."""

    use_hub: bool = True
    roco_max: int = 3000
    pubmedvision_max: int = 2000
    mtsamples_max: int = 0  # 0 = all rows
    synthetic_documents: int = 300
    min_text_chars: int = 50
    # MTSamples transcriptions (up to ~2,400 characters, ~600 tokens) are split into pages of
    # at most this many characters, each its own sample, so that page image (~616 visual
    # tokens at the 7b pixel budget), prompt and answer fit train.max_length 1024.
    mtsamples_page_chars: int = 1000
    # Pages kept per transcription (its first ones): more would let MTSamples (~5,000 rows,
    # ~3 pages each) outnumber the image sources in the 7b training set.
    mtsamples_pages_per_row: int = 1
    # Samples whose prompt + image + answer exceed train.max_length are dropped (a cut answer
    # never trains its closing <|im_end|>, so the model learns not to stop); phase 5 fails
    # when more than this share of the samples would be dropped.
    max_too_long_fraction: float = 0.02
    min_train_samples: int = 100
    # Put each page's OCR text (medvl/medical/ocr.py) before the instruction, in training (phase 5
    # writes it into every prompt), evaluation and serving (/extract, /analyze, the CLI run OCR
    # first). Costs 1-2 s of CPU per page; off by default (the tiny experiment: README).
    ocr_grounded_prompt: bool = False
    # An export of the review store (GET /review/export, JSON lines): its reviewed pages join the
    # training split (never validation or test), de-duplicated against the other sources and
    # refused when they are a test or evaluation page; "" for none.
    reviewed_records: str = ""
    split_seed: int = 42
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class TrainSettings:
    """Phase 6: QLoRA hyper-parameters (the seed's values in the 7b profile)."""

    quantize_4bit: bool = True
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    # LoRA on the language model's output head (lm_head) too. Off for the real model, whose
    # head has produced every token; on for a stand-in whose short pre-training never had the
    # record's tokens as targets (the `small` profile's YAML gives the measurement).
    lora_output_head: bool = False
    epochs: float = 2.0
    max_steps: int = -1  # > 0 overrides epochs (short GPU probes)
    per_device_batch_size: int = 2
    grad_accum_steps: int = 8
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 1024
    save_steps: int = 200
    save_total_limit: int = 3
    eval_steps: int = 200
    logging_steps: int = 10
    gradient_checkpointing: bool = True
    seed: int = 42
    # Where training curves go: "tensorboard" (logs/tensorboard/), "wandb", both
    # comma-separated, or "none".
    report_to: str = "tensorboard"
    # The Trainer's optimizer by name; "auto": paged 8-bit AdamW (bitsandbytes) on a GPU,
    # as QLoRA does, torch AdamW on a CPU.
    optimizer: str = "auto"
    # Processes that load and collate batches (the Qwen processor resizes each page) while
    # the GPU trains; 0 collates in the training process.
    dataloader_workers: int = 4
    # Training batches are right-padded to a multiple of this many tokens (1 = to the longest
    # row): fewer distinct sequence lengths mean fewer first-time kernel set-ups on a GPU.
    pad_to_multiple_of: int = 1
    # Pack each micro-batch's samples end to end into one row, with their own positions and
    # attention (medvl/training/trainer.py, VisionChatCollator.packed), instead of padding them
    # to the longest: no padding tokens. Its speed on a GPU is not measured yet (issue 46).
    pack_samples: bool = False
    # Gate 6: the trainable share of parameters this profile should land in (percent).
    expected_trainable_pct_min: float = 1.0
    expected_trainable_pct_max: float = 5.0


@dataclass
class DecodeSettings:
    """How answers are generated in benchmarks, evaluation, the API and the CLI: one engine
    (medvl/engine/scheduler.py), continuous batching over a slot KV cache (medvl/engine/slot_cache.py)."""

    compile: str = "auto"  # the decoding step: auto (on a CUDA GPU only) | on | off
    # Prompt + answer tokens one request may hold; longer requests are refused (API: 400).
    max_cache_len: int = 2048
    max_batch_size: int = 8  # cache slots: requests decoding at once (steps compiled for powers of two up to it)
    max_waiting: int = 64  # requests queued for a slot; past it the API answers 503 with Retry-After
    # Prompt tokens prefilled per engine turn, between two decoding steps (vLLM's chunked
    # prefill): arrivals side by side, a longer prompt in chunks over several turns. Smaller
    # bounds how long running rows pause; larger prefills more per pause.
    max_prefill_tokens: int = 2048
    # Run the vision tower when a request is prepared (in the preparing thread, on a CUDA stream
    # of its own) rather than inside the engine's prefill, where it paused every running row.
    vision_in_prepare: bool = True


OCR_BACKENDS = ("auto", "onnxruntime", "torch")  # api.ocr_backend


@dataclass
class ApiSettings:
    """The server's settings (``medvl/http/server.py``; its --port etc. are shortcuts for these), and
    the CLI's upload limits."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    # PDFs (medvl/engine/pages.py): pages per document (checked before rendering any), and the
    # resolution pages are rendered at (at most max_image_pixels per page)
    max_pdf_pages: int = 20
    pdf_render_dpi: int = 150
    request_timeout_s: float = 120.0
    max_new_tokens: int = 512  # answer tokens for /extract and /analyze, and chat's default max_tokens
    # After the engine dies (any failure in its loop), /health answers 503 for this long, so a
    # probe sees why, then the process exits non-zero for its supervisor to restart it.
    dead_engine_exit_s: float = 5.0
    # logs/audit.jsonl (medvl/http/audit.py): one line per request, no patient data; rotated
    # past this size, keeping this many earlier files.
    audit_max_mb: float = 50.0
    audit_backups: int = 5
    # /extract lists in needs_review every item whose confidence (medvl/medical/confidence.py:
    # the probability the model gave its least sure field's exact value) is below this.
    review_below_confidence: float = 0.5
    # /extract gives each field the box of the page's OCR text it matches (medvl/medical/sources.py);
    # the OCR runs on the CPU while the model decodes (seconds a page on a 2-core CPU; README).
    source_boxes: bool = True
    # What runs PP-OCR's networks for the server's page readings (source boxes, grounded prompts,
    # the OCR baseline): "onnxruntime" (CPU), "torch" (PyTorch via onnx2torch, on the GPU when
    # there is one: medvl/medical/ocr_torch.py), "auto" (torch when a GPU is visible).
    ocr_backend: str = "auto"  # one of OCR_BACKENDS
    # Worker processes reading the server's pages (medvl.medical.ocr.ReadingPool): -1 (auto) is
    # four sharing the GPU when PP-OCR runs there, none on a CPU host (ONNX Runtime then takes
    # every core for one page in the server's process); 0 none; N that many. One process reads
    # one page at a time (0.14 s a page on an H100 with PyTorch), so at 32 clients /extract's
    # source boxes waited on one reader (issue 44).
    ocr_workers: int = -1
    # Threads preparing arriving requests (decoding, the processor, the vision tower; pages waiting
    # for the tower share one call). More let more pages share a call under load (8 in the H100
    # figures of docs/results/h100, issue 32), but each thread's malloc arena stays allocated: on
    # the CPU reliability run 8 grew the server by 383 MB against 98 MB for 2. The 7b profiles set 8.
    prepare_threads: int = 2
    # Where torch.compile (Inductor) and Triton keep the decoding steps they compiled, so that a
    # restarted or scaled-out replica reuses them instead of compiling again (medvl/engine/
    # compile_cache.py). Relative to the workdir (on Kubernetes the models volume every replica
    # mounts); empty keeps torch's own per-user folder under /tmp.
    compile_cache_dir: str = "cache/compile"
    # The reviewer's loop (medvl/review): keep /extract results for review in a database
    # (MEDVL_DATABASE_URL, else <workdir>/review/review.db) and serve the /review routes; the
    # patient data it keeps is encrypted with MEDVL_REVIEW_KEY, without which the server will not start.
    review_store: bool = False
    # File every /extract result for review (with review_store), not only those asked ?review=true.
    file_for_review: bool = False


# What a served model's answers depend on: every setting but where the server listens. The
# server reports their fingerprint (/health), phase 8 checks it is the run's.
SERVED_SETTINGS = ("model", "bench", "quant", "data", "train", "decode", "api.max_upload_mb",
                   "api.max_image_pixels", "api.max_pdf_pages", "api.pdf_render_dpi", "api.request_timeout_s",
                   "api.max_new_tokens", "api.review_below_confidence",
                   "api.source_boxes", "api.ocr_backend")

SECTIONS: dict[str, type] = {
    "model": ModelSettings,
    "bench": BenchSettings,
    "quant": QuantSettings,
    "data": DataSettings,
    "train": TrainSettings,
    "decode": DecodeSettings,
    "api": ApiSettings,
}


@dataclass
class Settings:
    """The resolved settings of one run: a profile name plus every section."""

    profile: str = DEFAULT_PROFILE
    # The --set overrides the profile was loaded with, so a process this run starts (phase 8's
    # server) loads the same settings.
    overrides: list[str] = field(default_factory=list)
    model: ModelSettings = field(default_factory=ModelSettings)
    bench: BenchSettings = field(default_factory=BenchSettings)
    quant: QuantSettings = field(default_factory=QuantSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    api: ApiSettings = field(default_factory=ApiSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, sections: typing.Iterable[str] | None = None) -> str:
        """A short hash of the named sections (all when None), for telling stale outputs.

        A name may also be one setting (``"train.max_length"``), for a phase that depends on
        it but not on the rest of its section.
        """
        data = self.to_dict()
        chosen = sorted(sections) if sections is not None else sorted(SECTIONS)
        payload = {name: _lookup(data, name) for name in chosen}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def record(self, sections: typing.Iterable[str]) -> dict[str, Any]:
        """What every output JSON embeds: profile, the phase's fingerprint, all settings."""
        return {
            "profile": self.profile,
            "settings_hash": self.fingerprint(sections),
            "settings": self.to_dict(),
        }


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for key in dotted.split("."):
        value = value[key]
    return value


# --------------------------------------------------------------------------- loading


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_settings(profile: str = DEFAULT_PROFILE, overrides: list[str] | None = None) -> Settings:
    """Profile YAML + ``section.key=value`` overrides -> validated :class:`Settings`.

    Raises :class:`SettingsError` naming every problem at once.
    """
    problems: list[str] = []
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise SettingsError(
            [f"unknown profile {profile!r} (available: {', '.join(available_profiles())})"]
        )
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SettingsError([f"{path}: top level must be a mapping"])

    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, body in raw.items():
        if section not in SECTIONS:
            problems.append(f"{path.name}: unknown section {section!r}")
            continue
        if not isinstance(body, dict):
            problems.append(f"{path.name}: section {section!r} must be a mapping")
            continue
        values[section].update(body)

    for item in overrides or []:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            problems.append(f"--set {item!r}: expected section.key=value (e.g. train.lora_r=16)")
            continue
        if section not in SECTIONS:
            problems.append(f"--set {key}: unknown section {section!r} (one of {', '.join(SECTIONS)})")
            continue
        values[section][name] = _OverrideText(text)

    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        sections[section] = _build_section(section, cls, values[section], problems)
    if problems:
        raise SettingsError(problems)
    settings = Settings(profile=profile, overrides=list(overrides or []), **sections)
    problems.extend(_check_values(settings))
    if problems:
        raise SettingsError(problems)
    return settings


class _OverrideText(str):
    """A value that came from the command line as text and still needs parsing."""


def _build_section(section: str, cls: type, given: dict[str, Any], problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in given.items():
        if name not in known:
            problems.append(f"{section}.{name}: unknown setting (known: {', '.join(sorted(known))})")
            continue
        try:
            kwargs[name] = _coerce(value, hints[name])
        except (TypeError, ValueError) as exc:
            problems.append(f"{section}.{name}: {exc}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable if a field lacks a default
        problems.append(f"{section}: {exc}")
        return cls()


def _coerce(value: Any, hint: Any) -> Any:
    """Parse override text, and type-check YAML values, against a field's annotation."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, _OverrideText) and value.lower() in ("none", "null")):
            return None
        hint = args[0]
    if isinstance(value, _OverrideText):
        value = _parse_text(str(value), hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return str(value)
    return value


def _parse_text(text: str, hint: Any) -> Any:
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise TypeError(f"expected true/false, got {text!r}")
    if hint is int:
        try:
            return int(text.replace("_", ""))
        except ValueError:
            raise TypeError(f"expected an integer, got {text!r}") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise TypeError(f"expected a number, got {text!r}") from None
    return text


def _check_values(s: Settings) -> list[str]:
    """Cross-field and range checks that types alone cannot express."""
    p: list[str] = []
    m, t, d = s.model, s.train, s.data
    if m.source not in ("hub", "standin"):
        p.append(f"model.source: must be 'hub' or 'standin', got {m.source!r}")
    if m.standin_architecture not in ("tiny", "small", "7b"):
        p.append(f"model.standin_architecture: one of tiny, small, 7b, got {m.standin_architecture!r}")
    if m.pretrain_steps < 0 or m.pretrain_batch_size < 1 or m.pretrain_learning_rate <= 0:
        p.append("model.pretrain_steps must be >= 0, model.pretrain_batch_size >= 1, "
                 "model.pretrain_learning_rate > 0")
    if m.pretrain_steps and m.source != "standin":
        p.append("model.pretrain_steps: only a stand-in (model.source=standin) is pre-trained; "
                 "the hub model comes trained")
    if m.pretrain_steps and m.pretrain_documents < 2 * m.pretrain_batch_size:
        p.append("model.pretrain_documents: must be at least two batches (model.pretrain_batch_size)")
    if m.attn_implementation not in ("auto", "sdpa", "eager", "flash_attention_2"):
        p.append("model.attn_implementation: one of auto, sdpa, eager, flash_attention_2")
    if m.min_pixels < 28 * 28:
        p.append("model.min_pixels: must be at least 784 (one 28x28 visual token)")
    if m.max_pixels < m.min_pixels:
        p.append("model.max_pixels: must be >= model.min_pixels")
    if not m.slug or "/" in m.slug:
        p.append("model.slug: must be a non-empty folder name")
    if m.standin_tokenizer not in ("trained", "qwen2.5"):
        p.append(f"model.standin_tokenizer: must be 'trained' or 'qwen2.5', got {m.standin_tokenizer!r}")
    if m.standin_tokenizer == "qwen2.5" and m.standin_tokenizer_vocab != ModelSettings.standin_tokenizer_vocab:
        p.append("model.standin_tokenizer_vocab: applies only to standin_tokenizer 'trained' "
                 "(Qwen2.5's tokenizer has 151,665 tokens)")
    if m.standin_tokenizer_vocab < 512:
        p.append("model.standin_tokenizer_vocab: must be at least 512 (256 bytes + merges)")
    for name in ("num_documents", "max_new_tokens", "eval_max_new_tokens"):
        if getattr(s.bench, name) < 1:
            p.append(f"bench.{name}: must be >= 1")
    if s.bench.eval_concurrency < 1:
        p.append("bench.eval_concurrency: must be >= 1")
    unknown = [f for f in s.bench.also_forms() if f not in LOAD_TIME_FORMS]
    if unknown:
        p.append(f"bench.eval_also_forms: {', '.join(unknown)} not among the forms made at load "
                 f"({', '.join(LOAD_TIME_FORMS)})")
    if s.bench.warmup_runs < 0:
        p.append("bench.warmup_runs: must be >= 0")
    if s.quant.awq_w_bit not in (4,):
        p.append("quant.awq_w_bit: only 4-bit AWQ is supported")
    if s.quant.awq_group_size not in (32, 64, 128):
        p.append("quant.awq_group_size: one of 32, 64, 128 (the int4 kernel's group sizes)")
    if not s.quant.awq_zero_point:
        p.append("quant.awq_zero_point: only asymmetric AWQ (zero point) is supported: the int4 kernel has a zero per group")
    if s.quant.awq_calibration_samples < 1:
        p.append("quant.awq_calibration_samples: must be >= 1")
    if t.pack_samples and t.pad_to_multiple_of != 1:
        p.append("train.pack_samples: a packed row has no padding; set train.pad_to_multiple_of=1 with it")
    if s.api.file_for_review and not s.api.review_store:
        p.append("api.file_for_review: needs api.review_store (the database the results are filed in)")
    if not 0 < d.val_fraction < 0.5 or not 0 < d.test_fraction < 0.5:
        p.append("data.val_fraction/test_fraction: each must lie in (0, 0.5)")
    # A rendered page holds 60 lines of 88 characters; a longer page's answer would name text
    # the image does not show.
    if not 200 <= d.mtsamples_page_chars <= 4000 or d.mtsamples_pages_per_row < 1:
        p.append("data.mtsamples_page_chars must lie in 200..4000 and data.mtsamples_pages_per_row be >= 1")
    if not 0 <= d.max_too_long_fraction < 1:
        p.append("data.max_too_long_fraction: must lie in [0, 1)")
    if d.min_text_chars < 0 or d.min_train_samples < 1:
        p.append("data.min_text_chars must be >= 0 and data.min_train_samples >= 1")
    if t.lora_r < 1 or t.lora_alpha < 1:
        p.append("train.lora_r and train.lora_alpha: must be >= 1")
    if not 0 <= t.lora_dropout < 1:
        p.append("train.lora_dropout: must lie in [0, 1)")
    if t.learning_rate <= 0:
        p.append("train.learning_rate: must be > 0")
    if t.epochs <= 0 and t.max_steps <= 0:
        p.append("train.epochs: must be > 0 unless train.max_steps > 0")
    if t.dataloader_workers < 0 or t.pad_to_multiple_of < 1:
        p.append("train.dataloader_workers must be >= 0 and train.pad_to_multiple_of >= 1")
    for name in ("per_device_batch_size", "grad_accum_steps", "save_steps", "save_total_limit",
                 "eval_steps", "logging_steps"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: must be >= 1")
    if t.max_length < 64:
        p.append("train.max_length: must be >= 64")
    unknown = set(report_destinations(t.report_to)) - {"tensorboard", "wandb"}
    if t.report_to.strip() != "none" and (unknown or not report_destinations(t.report_to)):
        p.append(f"train.report_to: 'none' or a comma-separated list of tensorboard, wandb; got {t.report_to!r}")
    if not 0 <= t.warmup_ratio < 1:
        p.append("train.warmup_ratio: must lie in [0, 1)")
    if s.decode.compile not in ("auto", "on", "off"):
        p.append(f"decode.compile: one of auto, on, off, got {s.decode.compile!r}")
    if s.decode.max_cache_len < 64 or s.decode.max_batch_size < 1:
        p.append("decode.max_cache_len must be >= 64 and decode.max_batch_size >= 1")
    if s.api.ocr_workers < -1:
        p.append(f"api.ocr_workers must be -1 (auto), 0 or a number of processes, not {s.api.ocr_workers}")
    if s.api.ocr_backend not in OCR_BACKENDS:
        p.append(f"api.ocr_backend must be one of {', '.join(OCR_BACKENDS)}, not {s.api.ocr_backend!r}")
    if s.api.prepare_threads < 1:
        p.append(f"api.prepare_threads must be >= 1, not {s.api.prepare_threads}")
    if not 0 <= s.api.review_below_confidence <= 1:
        p.append(f"api.review_below_confidence must be in [0, 1], not {s.api.review_below_confidence}")
    if s.decode.max_waiting < 1 or s.decode.max_prefill_tokens < 64:
        p.append("decode.max_waiting must be >= 1, decode.max_prefill_tokens >= 64")
    if not 1 <= s.api.port <= 65535:
        p.append("api.port: must lie in 1..65535")
    p += [f"api.{name}: must be > 0" for name in ("max_upload_mb", "max_image_pixels", "request_timeout_s",
                                                  "max_new_tokens", "audit_max_mb") if not getattr(s.api, name) > 0]
    p += ["api.max_pdf_pages: must be >= 1"] if s.api.max_pdf_pages < 1 else []
    p += ["api.pdf_render_dpi: must lie in 36..600"] if not 36 <= s.api.pdf_render_dpi <= 600 else []
    p += ["api.audit_backups: must be >= 0"] if s.api.audit_backups < 0 else []
    p += ["api.dead_engine_exit_s: must be >= 0"] if s.api.dead_engine_exit_s < 0 else []
    return p


def report_destinations(report_to: str) -> list[str]:
    """``train.report_to`` as the list the Trainer takes ("none" -> [])."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    return [] if names == ["none"] else names
