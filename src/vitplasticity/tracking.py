"""MLflow mirror of run folders (placeholder interface; replaced by the tracking module)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class JobRun:
    def log_history(self, rows: list[dict]) -> None:
        pass

    def log_metrics(self, metrics: dict) -> None:
        pass

    def log_artifacts(self, paths: list[Path]) -> None:
        pass


@contextlib.contextmanager
def track_job(settings: dict | None, *, run_dir: Path, run_name: str, kind: str, params: dict,
              tags: dict) -> Iterator[JobRun]:
    yield JobRun()
