"""Atomic writes, careful reads and the build log.

A phase killed halfway must never leave a half-written JSON that a later gate mistakes
for a result: every write goes to a temporary file in the same folder, is fsynced, and is
renamed over the target (rename is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputError(RuntimeError):
    """A phase output is missing or unreadable; the message says which and why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(folder: Path) -> Iterator[Path]:
    """Write a folder whole or not at all: yields ``<folder>.partial`` to fill; on success it
    replaces ``folder``, on any error it is removed. A killed run never leaves a half-written
    checkpoint under the real name."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: Path) -> Any:
    """Load a JSON output, turning absence or corruption into one clear :class:`OutputError`."""
    if not path.is_file():
        raise OutputError(f"{path} is missing")
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path} is not valid JSON ({exc})") from None


def dir_size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def append_build_log(log_path: Path, phase: int, title: str, lines: list[str]) -> None:
    """Append a dated section to docs/BUILD_LOG.md (rewritten atomically)."""
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    old = log_path.read_text("utf-8") if log_path.is_file() else "# Build log\n"
    body = "\n".join(f"- {line}" for line in lines)
    atomic_write_text(log_path, f"{old.rstrip()}\n\n## Phase {phase}: {title} ({stamp})\n\n{body}\n")
