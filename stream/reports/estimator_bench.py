"""`agestream bench --estimator NAME`: milliseconds per face at several batch sizes."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from estimators import create_estimator
from stream.config import EstimatorConfig


@dataclass(frozen=True)
class BenchRow:
    """One batch size's timing: the median over the repeats."""

    estimator: str
    batch: int
    ms_per_batch: float
    ms_per_face: float
    faces_per_s: float


def bench_estimator(
    name: str,
    config: EstimatorConfig,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    repeats: int = 10,
    models_dir: str | Path | None = None,
) -> list[BenchRow]:
    """Time `estimate` alone (crops ready) on random crops, after one warm-up call per size.

    Args:
        name: estimator to time; `config` supplies its model, options and providers.
        config: the estimator section of the config; its `age`/`gender` are ignored.
        batch_sizes: faces per call.
        repeats: timed calls per batch size; the median is reported.
        models_dir: model cache folder.
    """
    if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(
            f"repeats and batch sizes must be >= 1, but got {repeats} and {batch_sizes}"
        )
    single = dataclasses.replace(config, name=name, age=None, gender=None)
    estimator = create_estimator(single, models_dir)
    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        crops = {
            spec: rng.integers(0, 256, (batch, spec.size, spec.size, 3), dtype=np.uint8)
            for spec in estimator.crops
        }
        estimator.estimate(crops)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            estimator.estimate(crops)
            times.append((time.perf_counter() - started) * 1000)
        ms = float(np.median(times))
        rows.append(BenchRow(name, batch, ms, ms / batch, 1000 * batch / ms))
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    """A plain-text table of `bench_estimator` rows."""
    lines = [f"{'estimator':<16} {'batch':>5} {'ms/batch':>9} {'ms/face':>8} {'faces/s':>8}"]
    lines += [
        f"{r.estimator:<16} {r.batch:>5} {r.ms_per_batch:>9.2f} {r.ms_per_face:>8.2f} "
        f"{r.faces_per_s:>8.1f}"
        for r in rows
    ]
    return "\n".join(lines)
