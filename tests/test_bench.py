"""`agestream bench` on a short piece of a clip, and a short soak (tools/soak.py)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

from stream.cli import add_bench_arguments
from stream.config import Config
from stream.reports.bench import percentiles, run_bench, steady_rates
from tests.conftest import HAMILTON, require

ROOT = Path(__file__).resolve().parents[1]

# Soak: after warm-up, RSS may wobble (allocator, caches) but must not climb.
SOAK_DURATION_S = 24.0
SOAK_EVERY_S = 3.0
SOAK_GROWTH_LIMIT_MB = 40.0


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_given_samples_when_percentiles_then_p50_p95_and_count() -> None:
    assert percentiles([float(v) for v in range(1, 101)]) == {"p50": 50.5, "p95": 95.05, "n": 100}
    empty = percentiles([])
    assert empty["n"] == 0 and math.isnan(empty["p50"])


def test_given_url_when_benched_then_value_error_names_it() -> None:
    with pytest.raises(ValueError, match="video file"):
        run_bench(Config(), bench_args("rtsp://user:secret@127.0.0.1:9/x"))


def test_given_zero_rounds_when_benched_then_value_error_says_so() -> None:
    with pytest.raises(ValueError, match="--rounds must be at least 1, got 0"):
        run_bench(Config(), bench_args(str(HAMILTON), "--rounds", "0"))


def test_given_completion_times_when_steady_rates_then_warm_up_frames_left_out() -> None:
    slow_start = [0.0, 1.0] + [1.0 + 0.01 * i for i in range(1, 99)]  # then 100 FPS
    cpu = [0.0, 0.2] + [0.2 + 0.015 * i for i in range(1, 99)]  # then 1.5 cores

    fps, cores = steady_rates(slow_start, cpu)

    assert fps == pytest.approx(100.0) and cores == pytest.approx(1.5)
    short = steady_rates([0.0, 0.5, 0.6, 0.7], [0.0, 0.5, 0.55, 0.6])
    assert short == pytest.approx((10.0, 0.5)), "a short run skips its first half"
    assert all(math.isnan(value) for value in steady_rates([0.0], [0.0]))


def test_given_clip_when_benched_then_stages_fps_ratio_and_equal_frame_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = require(HAMILTON)
    report = tmp_path / "bench.json"

    code = run_bench(
        Config(),
        bench_args(
            str(clip),
            "--json",
            str(report),
            "--max-frames",
            "40",
            "--rounds",
            "2",
            "--live-seconds",
            "3",
        ),
    )

    assert code == 0
    results = json.loads(report.read_text())
    naive, pipeline = results["naive"], results["pipeline"]
    assert naive["frames"] == pipeline["frames"] == 40
    assert naive["frames_written"] == pipeline["frames_written"] == [40, 40], "every round"
    assert set(naive["stages_ms"]) >= {"decode", "detect", "overlay", "encode"}
    assert {"align", "estimate per face"} <= set(naive["stages_ms"]), "the clip shows a face"
    assert naive["stages_ms"]["decode"]["n"] == 2 * 40, "both rounds' samples pooled"
    assert {"detect", "align", "estimate"} <= set(pipeline["stages_ms"])
    for stat in (*naive["stages_ms"].values(), *pipeline["stages_ms"].values()):
        assert 0 <= stat["p50"] <= stat["p95"]
    assert results["decode"]["fps"] > 0
    for part in (naive, pipeline):
        assert 0 < part["cores_busy"] <= (os.cpu_count() or 1) + 0.1, part["cores_busy"]
    ratios = [
        piped / plain
        for plain, piped in zip(naive["fps_per_round"], pipeline["fps_per_round"], strict=True)
    ]
    assert len(ratios) == 2 and min(ratios) > 0
    assert results["speedup"] == pytest.approx(sum(ratios) / 2, abs=0.02), "median of two"
    live = results["live"]
    assert live["frames_processed"] == (3 + 1) * 30, "live seconds after 1 s of warm-up"
    assert live["frames_dropped"] >= 0
    assert 0 < live["capture_to_overlay_ms"]["p50"] <= live["capture_to_overlay_ms"]["p95"]
    assert "pipeline / naive" in capsys.readouterr().out


def _load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "tools" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_given_looping_live_source_when_soaked_then_rss_does_not_grow() -> None:
    clip = require(HAMILTON)  # 275 frames: loops about twice at 30 FPS in 24 s

    record = _load_soak().soak(Config(), str(clip), SOAK_DURATION_S, SOAK_EVERY_S)

    samples = record["samples"]
    assert len(samples) >= SOAK_DURATION_S / SOAK_EVERY_S - 1
    assert record["frames"] > 275, "the clip looped"
    frames = [sample["frames"] for sample in samples]
    assert frames == sorted(frames) and frames[-1] > frames[0]
    after_warm_up = [sample["rss_mb"] for sample in samples[1:]]
    assert max(after_warm_up) - after_warm_up[0] < SOAK_GROWTH_LIMIT_MB, samples
