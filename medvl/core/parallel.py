"""Work spread over the host's cores in worker processes: the pages phases 2 and 5 make.

Why processes: rendering a page is Pillow under the GIL, and reading it back by OCR (for the
OCR-grounded prompt) is ONNX Runtime at 1-2 s a page on one core of this 2-core CPU; a GPU
host's 16 cores make thousands of pages in a minute or two, each worker one core's worth.
Workers are spawned, not forked: the parent has torch and its thread pools loaded, which a
fork copies in a state the child cannot use safely.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tqdm import tqdm

log = logging.getLogger(__name__)

T = TypeVar("T")


def cores() -> int:
    """The cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def process_map(fn: Callable[[Any], T], items: Iterable[Any], desc: str, unit: str = "page",
                initializer: Callable[..., None] | None = None, initargs: tuple = (),
                workers: int | None = None) -> list[T]:
    """``[fn(item) for item in items]`` in order, over ``workers`` spawned processes (default:
    every core); in this process when one worker would do. ``fn`` and ``initializer`` must be
    module-level functions (they are pickled by name)."""
    items = list(items)
    count = min(workers or cores(), len(items))
    if count <= 1:
        if initializer is not None:
            initializer(*initargs)
        return [fn(item) for item in tqdm(items, desc=desc, unit=unit, mininterval=5)]
    log.info("%s: %d items over %d worker processes", desc, len(items), count)
    context = multiprocessing.get_context("spawn")
    with context.Pool(count, initializer, initargs) as pool:
        chunk = max(1, min(16, len(items) // (count * 4)))
        return list(tqdm(pool.imap(fn, items, chunksize=chunk), total=len(items), desc=desc, unit=unit,
                         mininterval=5))
