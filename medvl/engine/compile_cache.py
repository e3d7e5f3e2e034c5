"""Where the server's compiled decoding steps are kept between starts (api.compile_cache_dir).

Why: before it takes traffic the server compiles its decoding steps (torch.compile: Inductor
writes Triton kernels, Triton builds them): 74 s of a bf16 cold start's 111 s on an H100
(docs/results/h100/fp8/). Both
already cache what they build, but under a per-user folder in /tmp that a restarted container
or a new replica does not have. Pointed at a folder on the volume every replica mounts, the
second start finds Inductor's graphs (FX graph and AOTAutograd caches) and Triton's binaries and
skips building them; torch still traces the model, which the cache cannot skip. The caches key
their entries by torch version, GPU and code, and write each entry atomically, so replicas can
share the folder and a new image does not reuse an old image's kernels.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medvl.core.settings import Settings
from medvl.core.workdir import Workdir

log = logging.getLogger(__name__)


def compile_cache_dir(settings: Settings, wd: Workdir) -> Path | None:
    """The folder api.compile_cache_dir names (relative to the workdir), or None for torch's own."""
    if not settings.api.compile_cache_dir:
        return None
    folder = Path(settings.api.compile_cache_dir)
    return folder if folder.is_absolute() else wd.root / folder


def use_compile_cache(folder: Path | None) -> None:
    """Have Inductor and Triton keep their caches under ``folder`` (inductor/, triton/). Call it
    before the first compilation: both read these variables when they first write."""
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    log.info("compiled decoding steps cached in %s", folder)
