"""Phase 1: what this machine is and whether the pipeline can run on it.

The record (benchmarks/environment.json) is what later reports quote for "the hardware
actually used", so it reads the facts from the libraries rather than assuming them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

import psutil

# Model work (phases 2-4, 6, 7) cannot start without these: a failure fails gate 1.
CORE_IMPORTS = ["torch", "torchvision", "transformers", "peft", "bitsandbytes", "accelerate",
                "safetensors", "PIL", "yaml"]
# Needed by one phase each; reported here, and that phase refuses to start without them,
# so a GPU box that only trains need not carry the web stack.
EXTRA_IMPORTS = {"trl": "phase 6", "datasets": "phase 5 (hub datasets)", "fastapi": "phase 8",
                 "uvicorn": "phase 8", "gradio": "the demo UI", "matplotlib": "phase 9"}
REQUIRED_IMPORTS = CORE_IMPORTS + list(EXTRA_IMPORTS)
# Reported with versions, so a result can be reproduced.
REPORTED_PACKAGES = ["torch", "torchvision", "transformers", "tokenizers", "huggingface-hub",
                     "safetensors", "accelerate", "peft", "trl", "bitsandbytes", "datasets",
                     "autoawq", "flash-attn", "fastapi", "uvicorn", "pydantic", "gradio",
                     "prometheus-client", "pillow", "numpy", "matplotlib", "nvidia-ml-py"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def import_status() -> tuple[dict[str, bool], dict[str, str]]:
    """Try each required import; return ok-flags and the error of each failure."""
    ok: dict[str, bool] = {}
    errors: dict[str, str] = {}
    for module in REQUIRED_IMPORTS:
        try:
            importlib.import_module(module)
            ok[module] = True
        except Exception as exc:  # a broken install can raise anything at import
            ok[module] = False
            errors[module] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return ok, errors


def gpu_info() -> dict[str, Any]:
    """CUDA availability from torch; name and VRAM from NVML when the driver has it."""
    import torch

    info: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                            "devices": []}
    if not info["available"]:
        return info
    info["cudnn"] = torch.backends.cudnn.version()
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            info["devices"].append({"index": index, "name": pynvml.nvmlDeviceGetName(handle),
                                    "vram_gb": round(memory.total / 1e9, 2), "source": "nvml"})
        pynvml.nvmlShutdown()
    except Exception:  # NVML absent in some containers: fall back to torch
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["devices"].append({"index": index, "name": props.name,
                                    "vram_gb": round(props.total_memory / 1e9, 2), "source": "torch"})
    info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def collect() -> dict[str, Any]:
    imports, import_errors = import_status()
    return {
        "python": {"version": platform.python_version(), "version_info": list(sys.version_info[:3]),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(), "cpu_count": os.cpu_count(),
                     "ram_gb": round(psutil.virtual_memory().total / 1e9, 2)},
        "cuda": gpu_info(),
        "packages": package_versions(),
        "imports": imports,
        "import_errors": import_errors,
    }


def hardware_label(env: dict[str, Any]) -> str:
    """A short label such as 'NVIDIA H100 80GB HBM3' or 'CPU (2 cores)'."""
    devices = env.get("cuda", {}).get("devices") or []
    if devices:
        return devices[0]["name"] + (f" x{len(devices)}" if len(devices) > 1 else "")
    return f"CPU ({env.get('platform', {}).get('cpu_count')} cores)"
