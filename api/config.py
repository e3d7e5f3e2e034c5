"""The server's settings (flags and ``MEDVL_*`` environment variables) and the model it serves."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field

from medvl.engine import EngineMetrics
from medvl.forms import FORMS, FormError, choose
from medvl.serving import ServedModel, ServedOcr
from medvl.settings import Settings, SettingsError, load_settings
from medvl.workdir import Workdir

WEIGHTS = ("auto", *FORMS)
OCR = "ocr"  # --model ocr: the OCR + rules baseline instead of a model
DESCRIPTION = """The medvl HTTP API: structured extraction, free analysis, OpenAI-compatible chat.

Every option also reads a MEDVL_<NAME> environment variable (the flag wins). The model loads
in the background: until it is ready every inference route answers 503 with Retry-After.
"""


@dataclass
class ServerConfig:
    """Every server setting; each has a MEDVL_<NAME> environment variable and a --flag."""

    model: str = "best"  # best | base | finetuned | ocr | a model folder (see served_model)
    profile: str = "tiny"
    workdir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    max_image_pixels: int = 40_000_000
    cors_origins: list[str] = field(default_factory=list)
    api_key: str = ""
    request_timeout_s: float = 120.0
    max_batch_size: int = 0  # requests decoding at once; 0 = the profile's decode.max_batch_size
    max_new_tokens: int = 512  # answer length for /extract, /analyze, and chat without max_tokens
    weights: str = "auto"  # auto | bf16 | awq | nf4 | int4: the served form of the weights (see resolve_model)
    served_model_name: str = "medvl"  # the model id /v1/models lists and chat requests name
    set: list[str] = field(default_factory=list)  # profile overrides, section.key=value (as the pipeline takes)

    HELP = {
        "model": "best (the fine-tuned model if phase 7 ran, else the base), base, finetuned, a model folder, or "
                 "ocr (the OCR + rules baseline phase 7 scores: /extract only)",
        "max_batch_size": "requests decoding at once (0: the profile's decode.max_batch_size)",
        "max_new_tokens": "answer tokens for /extract and /analyze, and chat's default max_tokens",
        "weights": "auto (the profile's form, the one phase 7 evaluated: full precision on tiny, phase 4's 4-bit "
                   "method on the 7b profiles), bf16 (full precision; most requests/s under load on an H100), awq (the "
                   "AWQ int4 checkpoint, 4-bit in memory), nf4 (the bitsandbytes checkpoint), int4 (round-to-nearest "
                   "at start-up)",
        "request_timeout_s": "a request's limit, queue included; past it 504 and its slot is freed",
        "set": "override a profile setting, e.g. decode.max_waiting=128 (repeatable)",
    }

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> ServerConfig:
        defaults = cls()
        parser = argparse.ArgumentParser(prog="python -m api.server", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for name, value in asdict(defaults).items():
            env_name = f"MEDVL_{name.upper()}"
            env = os.environ.get(env_name)
            flag = f"--{name.replace('_', '-')}"
            about = cls.HELP.get(name, "")
            if name == "set":
                parser.add_argument(flag, action="append", default=env.split(",") if env else [],
                                    metavar="SECTION.KEY=VALUE", help=f"{about} (env {env_name}, comma-separated)")
            elif isinstance(value, list):
                default = [o for o in env.split(",") if o] if env is not None else value
                parser.add_argument(flag, default=default, type=lambda s: [o for o in s.split(",") if o],
                                    help=f"comma-separated {about} (env {env_name})")
            else:
                kind = type(value)
                parser.add_argument(flag, type=kind, default=kind(env) if env is not None else value,
                                    help=f"{about} (env {env_name}, default %(default)r)".strip())
        config = cls(**vars(parser.parse_args(argv)))
        if config.weights not in WEIGHTS:
            parser.error(f"--weights: one of {', '.join(WEIGHTS)}, got {config.weights!r}")
        if config.model == OCR and config.weights != "auto":
            parser.error(f"--weights {config.weights}: the OCR baseline has no weights to choose")
        try:
            config.settings()
        except SettingsError as exc:
            parser.error(str(exc))
        return config

    def settings(self) -> Settings:
        """The profile with ``--set`` overrides applied: what the engine and the model choice use."""
        return load_settings(self.profile, self.set)


def served_model(config: ServerConfig, metrics: EngineMetrics | None = None) -> tuple[ServedModel | ServedOcr, str]:
    """What the server serves and its kind: the OCR baseline for ``--model ocr``, else the
    model :func:`medvl.forms.choose` picks (as the CLI and phase 7 do): ``--model`` best, base,
    finetuned or a folder, in the form ``--weights`` names; ``auto`` is the profile's form, the
    one phase 7 evaluated (or a folder's own form).

    Measured under load on an H100 with ``7b-random`` (docs/results/h100/perf_serving*.json),
    bf16 served 12.8 requests/s at 32 clients where round-to-nearest int4 served 0-2.7
    (tinygemm's prefill takes ~3 s for a batch of 8 pages); int4 wins at one stream (2.6 vs
    7.5 ms per token) and in memory. ``--weights bf16`` trades memory for throughput, but then
    the served model is not the one phase 7 scored on the 7b profiles (/health names the form).
    """
    if config.model == OCR:
        return ServedOcr(), OCR
    settings = config.settings()
    try:
        folder, kind, form = choose(settings, Workdir.at(config.workdir or None), config.weights, config.model)
    except FormError as exc:
        raise SystemExit(f"error: {exc}") from None
    return ServedModel(folder, settings, form, slots=config.max_batch_size or None, metrics=metrics), kind
