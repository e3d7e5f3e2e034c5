"""Where a run's outputs live.

Everything a run writes sits under one working directory (default: the repository root),
so tests and a second profile never overwrite a user's real run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medvl.core.settings import Settings

# medvl/core/workdir.py -> the repository (an editable install's checkout)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Workdir:
    root: Path

    @classmethod
    def at(cls, path: str | Path | None) -> Workdir:
        return cls(Path(path).resolve() if path else REPO_ROOT)

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def test_images(self) -> Path:
        """The five phase-3 documents every benchmark reuses."""
        return self.datasets / "test_images"

    @property
    def benchmarks(self) -> Path:
        return self.root / "benchmarks"

    @property
    def docs(self) -> Path:
        return self.root / "docs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def build_log(self) -> Path:
        return self.docs / "BUILD_LOG.md"

    def bench(self, name: str) -> Path:
        """A benchmark JSON, e.g. ``bench("baseline_fp16")``."""
        return self.benchmarks / f"{name}.json"

    def base_model_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-base"

    def nf4_model_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-bnb-nf4"

    def adapter_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-medical-lora"

    def merged_model_dir(self, settings: Settings) -> Path:
        """The adapter merged into a full-precision base (what gets quantized for serving)."""
        return self.models / f"{settings.model.slug}-medical-merged"

    def finetuned_nf4_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-medical-nf4"

    def awq_model_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-awq-int4"

    def finetuned_awq_dir(self, settings: Settings) -> Path:
        return self.models / f"{settings.model.slug}-medical-awq-int4"

    def ensure(self) -> None:
        for folder in (self.models, self.datasets, self.benchmarks, self.docs, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
