"""Phase 2: put the base model in models/<slug>-base/.

``7b`` downloads the hub snapshot of Qwen/Qwen2.5-VL-7B-Instruct (resumable: a rerun
continues partial files); stand-in profiles build their model offline instead. Either way
the folder must load with the Auto classes before the phase passes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from medvl.core.settings import Settings

log = logging.getLogger(__name__)

# Only what loading needs: weights, configs, tokenizer, chat template.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "merges.txt", "vocab.json", "*.jinja", "*.model"]
HUB_IGNORE_PATTERNS = ["README*", "LICENSE*", "*.md", "*.bin", "*.pt", "*.pth", "*.msgpack",
                       "*.h5", ".gitattributes", "*.png", "*.jpg"]


class HubUnavailable(RuntimeError):
    """The hub could not be reached or refused the request; message is one line."""


def check_hub(repo_id: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when the hub is unreachable, before a long download starts."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise HubUnavailable("HF_HUB_OFFLINE is set; cannot download from the hub")
    try:
        HfApi().model_info(repo_id, timeout=timeout_s)
    except HfHubHTTPError as exc:
        raise HubUnavailable(f"hub refused {repo_id}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # DNS failure, proxy, TLS, timeout: all mean "no hub here"
        raise HubUnavailable(f"cannot reach huggingface.co for {repo_id} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None


def download_snapshot(repo_id: str, dest: Path) -> None:
    """snapshot_download into ``dest``; partial files resume on rerun; progress bars on."""
    from huggingface_hub import snapshot_download

    check_hub(repo_id)
    log.info("downloading %s to %s (resumes partial downloads)", repo_id, dest)
    snapshot_download(repo_id=repo_id, local_dir=dest, allow_patterns=HUB_ALLOW_PATTERNS,
                      ignore_patterns=HUB_IGNORE_PATTERNS, max_workers=8)


def weight_files(model_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(model_dir.glob("*.safetensors"))}


def validate_loads(model_dir: Path, settings: Settings) -> dict[str, Any]:
    """Load processor and model with the Auto classes; run one forward pass."""
    import torch

    from medvl.model.loading import input_device, load_model, load_processor

    started = time.perf_counter()
    processor = load_processor(model_dir, settings)
    model = load_model(model_dir, settings)
    ids = processor.tokenizer("Metformin 500 mg PO BID", return_tensors="pt").to(input_device(model))
    with torch.inference_mode():
        logits = model(**ids).logits
    ok = bool(torch.isfinite(logits).all())
    result = {"validated": ok, "load_check_s": round(time.perf_counter() - started, 2),
              "model_class": type(model).__name__, "processor_class": type(processor).__name__,
              "parameters": sum(p.numel() for p in model.parameters())}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
