"""`agestream bench VIDEO --streams N`: argument checks, the aggregate rate, a short run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from stream.cli import add_bench_arguments
from stream.config import Config
from stream.reports.bench import run_bench
from stream.reports.streams_bench import aggregate_fps, parse_streams
from tests.conftest import VIDEOS, require


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_given_stream_counts_when_parsed_then_list_or_one_line_error() -> None:
    assert parse_streams("4") == [4]
    assert parse_streams("1,2,4") == [1, 2, 4]
    for bad in ("0", "two", "1,,2", ""):
        with pytest.raises(ValueError, match="--streams takes positive stream counts"):
            parse_streams(bad)


def test_given_streams_done_times_when_aggregated_then_counted_while_all_run() -> None:
    # Two streams at 100 FPS each, the second starting 1 s later; 40 warm-up frames each
    # leave at most 30 skipped: together 200 FPS while both run.
    first = [i * 0.01 for i in range(400)]
    second = [1.0 + i * 0.01 for i in range(400)]

    assert aggregate_fps({"a": first, "b": second}) == pytest.approx(200.0, rel=0.02)


def test_given_clip_when_benched_with_streams_then_ratio_batch_and_live_latency(
    tmp_path: Path,
) -> None:
    clip = require(VIDEOS / "livePortrait__driving__d19.mp4")
    report = tmp_path / "bench.json"
    args = bench_args(
        str(clip), "--streams", "2", "--rounds", "1", "--live-fps", "10",
        "--live-seconds", "2", "--json", str(report),
    )  # fmt: skip

    assert run_bench(Config(), args) == 0

    results = json.loads(report.read_text())
    two = results["file"]["2 streams"]
    assert results["file"]["single_fps"] > 0 and two["aggregate_fps"] > 0
    assert two["frames_per_stream"] == [250, 250], "lossless: every frame of both copies"
    assert two["mean_batch"] >= 1.0
    live = results["live"]["per_stream"]
    assert sorted(live) == ["live1", "live2"]
    assert all(
        part["frames"] > 0 and part["capture_to_annotated_ms"]["n"] > 0 for part in live.values()
    )
