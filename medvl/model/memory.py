"""Memory of a loaded model, measured one way for every phase and benchmark.

A GPU's figures come from torch's allocator (allocated, peak) and NVML (device used); a CPU's
from the process's resident set size, labelled as such (its peak is the process's high-water
mark and cannot be reset). Quantized tensor subclasses are counted by their real storage.
"""

from __future__ import annotations

import gc
import resource
from typing import Any

import psutil
import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_now() -> dict[str, float]:
    """Current memory in MB: torch + NVML on a GPU, process RSS always."""
    snap = {"process_rss_mb": psutil.Process().memory_info().rss / 2**20}
    if torch.cuda.is_available():
        snap["torch_allocated_mb"] = torch.cuda.memory_allocated() / 2**20
        snap["torch_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            snap["nvml_used_mb"] = pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        except Exception:  # no NVML in this container
            pass
    return snap


def reset_peak_memory() -> None:
    """Start a new "peak" on a GPU (a CPU's peak RSS cannot be reset: it is the process's)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, including quantized tensor subclasses (their inner tensors:
    a torchao int4 weight reports its bf16 shape and dtype, but holds packed 4-bit codes)."""
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weights_footprint_mb(model: Any) -> float:
    """The model's parameters and buffers as stored (transformers' ``get_memory_footprint``
    counts a tensor subclass at its logical dtype, 4x too much for int4)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor_bytes(t) for t in tensors) / 2**20


def peak_memory_mb() -> float:
    """The figure called "peak": torch's max allocated on a GPU, peak RSS on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def memory_kind() -> str:
    return ("GPU: torch allocator (allocated/peak) and NVML (device used)" if torch.cuda.is_available()
            else "CPU: process resident set size (RSS); peak is the process high-water mark")


def headline_memory_mb(snap: dict[str, float]) -> float:
    """The one number a table shows for "memory": GPU allocated, or CPU RSS."""
    return snap.get("torch_allocated_mb", snap["process_rss_mb"])


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unload(model: Any) -> None:
    """Free a model's memory before the next phase or variant loads."""
    del model
    free_memory()
