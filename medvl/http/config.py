"""The server's settings (flags and ``MEDVL_*`` environment variables) and the model it serves."""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from medvl.core.settings import Settings, SettingsError, load_settings
from medvl.core.workdir import Workdir
from medvl.engine.loader import Served, open_served
from medvl.engine.scheduler import EngineMetrics
from medvl.model.forms import FORMS, FormError

WEIGHTS = ("auto", *FORMS)
DESCRIPTION = """The medvl HTTP API: structured extraction, free analysis, OpenAI-compatible chat.

Settings come from the profile (--profile) with --set overrides, as every phase takes them;
the flags below that name a setting (--port is api.port, ...) override those. Every option also
reads a MEDVL_<NAME> environment variable (the flag wins). The model loads in the background:
until it is ready every inference route answers 503 with Retry-After.
"""

# Flags that are shortcuts for a profile setting: --port 9000 is --set api.port=9000.
SETTING_FLAGS = {
    "host": ("api.host", "address to listen on"),
    "port": ("api.port", "port to listen on"),
    "max_upload_mb": ("api.max_upload_mb", "largest upload accepted (413 past it)"),
    "max_image_pixels": ("api.max_image_pixels", "largest image accepted, in pixels (413 past it)"),
    "max_pdf_pages": ("api.max_pdf_pages", "most pages a PDF may have (400 past it, before rendering)"),
    "pdf_render_dpi": ("api.pdf_render_dpi", "resolution PDF pages are rendered at"),
    "request_timeout_s": ("api.request_timeout_s", "a request's limit, queue included; past it 504 and its slot is freed"),
    "max_new_tokens": ("api.max_new_tokens", "answer tokens for /extract and /analyze, and chat's default max_tokens"),
    "max_batch_size": ("decode.max_batch_size", "requests decoding at once"),
}


@dataclass
class ServerConfig:
    """One server process: its settings (profile + overrides, resolved once) and what is not a
    pipeline setting: the model to serve, the API key, CORS origins, the name chat requests use."""

    profile: str = "tiny"
    workdir: str = ""
    set: list[str] = field(default_factory=list)  # profile overrides, section.key=value (as the pipeline takes)
    model: str = "best"  # best | base | finetuned | ocr | a model folder (see served_model)
    weights: str = "auto"  # auto | bf16 | awq | nf4 | int4: the served form of the weights (see served_model)
    api_key: str = ""
    cors_origins: list[str] = field(default_factory=list)
    served_model_name: str = "medvl"  # the model id /v1/models lists and chat requests name
    settings: Settings | None = None  # resolved from profile and set when not given

    HELP = {
        "profile": "settings profile (medvl/core/profiles/NAME.yaml), as the pipeline takes it",
        "workdir": "the pipeline's run folder, where models/ and benchmarks/ are (default: the repository root)",
        "set": "override a profile setting, e.g. decode.max_waiting=128 (repeatable)",
        "model": "best (the fine-tuned model if phase 7 ran, else the base), base, finetuned, a model folder, or "
                 "ocr (the OCR + rules baseline phase 7 scores: /extract only)",
        "weights": "auto (the profile's form, the one phase 7 evaluated: full precision on tiny, phase 4's 4-bit "
                   "method on the 7b profiles), bf16 (full precision; most requests/s under load on an H100), awq (the "
                   "AWQ int4 checkpoint, 4-bit in memory), nf4 (the bitsandbytes checkpoint), int4 (round-to-nearest "
                   "at start-up)",
        "api_key": "required in X-API-Key or a Bearer token on every route but /health",
        "cors_origins": "origins allowed to call the API from a browser",
        "served_model_name": "the model id /v1/models lists and chat requests must name",
    }

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = load_settings(self.profile, self.set)

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> ServerConfig:
        parser = argparse.ArgumentParser(prog="python -m medvl.http.server", description=DESCRIPTION,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for spec in fields(cls):
            if spec.name in cls.HELP:
                _add_flag(parser, spec.name, spec.default if spec.default is not MISSING else [],
                          cls.HELP.get(spec.name, ""))
        for name, (setting, about) in SETTING_FLAGS.items():
            env = os.environ.get(f"MEDVL_{name.upper()}")
            parser.add_argument(f"--{name.replace('_', '-')}", default=env, metavar="VALUE",
                                help=f"{about}: sets {setting} (env MEDVL_{name.upper()}; default: the profile's)")
        args = vars(parser.parse_args(argv))
        shortcuts = [f"{SETTING_FLAGS[name][0]}={args.pop(name)}" for name in SETTING_FLAGS if args[name] is not None]
        if args["weights"] not in WEIGHTS:
            parser.error(f"--weights: one of {', '.join(WEIGHTS)}, got {args['weights']!r}")
        args = {k: v for k, v in args.items() if k not in SETTING_FLAGS}
        args["set"] = [*args["set"], *shortcuts]  # the flags override --set, which overrides the profile
        try:
            return cls(**args)
        except SettingsError as exc:
            parser.error(str(exc))


def _add_flag(parser: argparse.ArgumentParser, name: str, default: Any, about: str) -> None:
    """``--name`` with a MEDVL_NAME environment variable as its default (lists comma-separated)."""
    env_name = f"MEDVL_{name.upper()}"
    env = os.environ.get(env_name)
    flag = f"--{name.replace('_', '-')}"
    if name == "set":
        parser.add_argument(flag, action="append", default=env.split(",") if env else [],
                            metavar="SECTION.KEY=VALUE", help=f"{about} (env {env_name}, comma-separated)")
    elif isinstance(default, list):
        parser.add_argument(flag, default=[o for o in env.split(",") if o] if env is not None else default,
                            type=lambda s: [o for o in s.split(",") if o], help=f"comma-separated {about} (env {env_name})")
    else:
        parser.add_argument(flag, default=env if env is not None else default,
                            help=f"{about} (env {env_name}, default %(default)r)".strip())


def served_model(config: ServerConfig, wd: Workdir,
                 metrics: EngineMetrics | None = None) -> tuple[Served, str]:
    """What the server serves and its kind (:func:`medvl.engine.loader.open_served`, as the CLI).

    Measured under load on an H100 with ``7b-random``, the mixed workload at 32 clients
    (docs/results/h100/perf_serving_mixed_*.json, one machine): bf16 11.93 requests/s, the int4
    layers (medvl/model/w4a16.py) 10.27 (0.86x), /extract 11.87 against 11.93. ``--weights bf16``
    trades memory for the last 10-15% of throughput, but then the served model is not the one
    phase 7 scored on the 7b profiles (/health names the form).
    """
    try:
        return open_served(config.settings, wd, config.model, config.weights, metrics=metrics)
    except FormError as exc:
        raise SystemExit(f"error: {exc}") from None
