"""`agestream bench VIDEO --streams N[,N...]`: many streams through one batched estimator.

File mode, unpaced, in one run so that the figures compare: the single-stream pipeline
(`pipeline.run`, the path of `agestream run`) and the hub serving N copies of the clip at
once (`StreamHub`, lossless like files, one `EstimateBatcher`), alternating for a few
rounds; both write the same outputs (mp4, JSON lines, tracks CSV). The hub's aggregate rate
is counted while all N streams run, past each stream's warm-up frames; the ratio
aggregate / single is the median of the rounds' ratios, beside the batcher's mean batch.

Live mode (`--live-fps F`): the largest N streams, each the clip played as an F FPS camera
(newest frame wins), for `--live-seconds` after 1 s of warm-up: per stream capture to
annotated frame p50/p95 and the share of frames dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stream.config import Config
from stream.outputs import write_report
from stream.reports.bench import LIVE_WARM_UP_S, WARM_UP_FRAMES, percentiles, steady_rates
from stream.sources import SimulatedLiveSource, VideoSource

if TYPE_CHECKING:
    from stream.batcher import EstimateBatcher
    from stream.types import FrameResult

log = logging.getLogger(__name__)

# How long a hub run may take before the bench gives up on it.
HUB_RUN_LIMIT_S = 600.0


def parse_streams(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]; ValueError for anything but positive integers."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--streams takes positive stream counts such as 4 or 1,2,4, got {text!r}")
    return counts


def single_run(config: Config, source: str, folder: Path) -> float:
    """Steady-state FPS of `run` on `source`, writing video, JSON lines and tracks."""
    from stream.pipeline import run
    from stream.stages import RunSummary

    done_at: list[float] = []
    cpu_at: list[float] = []

    def record(result: FrameResult, at: float) -> None:
        done_at.append(at)
        cpu_at.append(time.process_time())

    output = dataclasses.replace(
        config.output,
        window=False,
        video=str(folder / "single.mp4"),
        json=str(folder / "single.jsonl"),
        tracks=str(folder / "single.csv"),
    )
    run(dataclasses.replace(config, output=output), source, RunSummary(source), on_result=record)
    return steady_rates(done_at, cpu_at)[0]


def aggregate_fps(done_at: dict[str, list[float]]) -> float:
    """Frames per second of all streams together while every one of them runs past its
    warm-up: from the last stream's first steady frame to the first stream's end."""
    starts, ends = [], []
    for times in done_at.values():
        skip = min(WARM_UP_FRAMES, len(times) // 2)
        starts.append(times[skip])
        ends.append(times[-1])
    start, end = max(starts), min(ends)
    if end <= start:
        return float("nan")
    inside = sum(sum(start < t <= end for t in times) for times in done_at.values())
    return inside / (end - start)


def hub_run(
    config: Config, source: str, streams: int, batcher: EstimateBatcher, folder: Path
) -> dict:
    """N copies of `source` through one hub, unpaced and lossless; aggregate FPS and the
    batcher's mean batch during the run."""
    from stream.hub import StreamHub

    done_at: dict[str, list[float]] = defaultdict(list)
    calls, faces = batcher.calls, batcher.faces
    hub = StreamHub(
        config,
        batcher,
        output_dir=folder / f"hub{streams}",
        pace_files=False,
        on_result=lambda stream_id, result, at: done_at[stream_id].append(at),
    )
    with hub:
        for number in range(1, streams + 1):
            hub.add(VideoSource(source), f"s{number}")
        deadline = time.monotonic() + HUB_RUN_LIMIT_S
        while any(s.state in ("starting", "running") for s in hub.streams()):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the hub run of {streams} streams took over {HUB_RUN_LIMIT_S} s"
                )
            time.sleep(0.05)
        failed = [s for s in hub.streams() if s.state == "failed"]
    if failed:
        raise RuntimeError(f"stream {failed[0].id} failed: {failed[0].error}")
    batch_calls = batcher.calls - calls
    return {
        "fps": aggregate_fps(done_at),
        "frames": [len(times) for times in done_at.values()],
        "mean_batch": (batcher.faces - faces) / batch_calls if batch_calls else 0.0,
    }


def file_mode(
    config: Config, source: str, counts: list[int], rounds: int, batcher: EstimateBatcher
) -> dict:
    """Alternating rounds of the single pipeline and the hub with each of `counts` streams."""
    single: list[float] = []
    hubs: dict[int, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="agestream-streams-bench-") as scratch:
        for number in range(1, rounds + 1):
            log.info("bench --streams: round %d of %d: single stream", number, rounds)
            single.append(single_run(config, source, Path(scratch)))
            for count in counts:
                log.info("bench --streams: round %d of %d: %d streams", number, rounds, count)
                hubs[count].append(hub_run(config, source, count, batcher, Path(scratch)))
    results = {
        "single_fps": round(float(np.median(single)), 2),
        "single_fps_per_round": [round(fps, 2) for fps in single],
    }
    for count in counts:
        runs = hubs[count]
        ratios = [run["fps"] / alone for run, alone in zip(runs, single)]
        results[f"{count} streams"] = {
            "aggregate_fps": round(float(np.median([run["fps"] for run in runs])), 2),
            "aggregate_fps_per_round": [round(run["fps"], 2) for run in runs],
            "ratio": round(float(np.median(ratios)), 3),
            "ratio_per_round": [round(ratio, 3) for ratio in ratios],
            "mean_batch": round(float(np.median([run["mean_batch"] for run in runs])), 2),
            "frames_per_stream": runs[-1]["frames"],
        }
    return results


def live_mode(
    config: Config,
    source: str,
    streams: int,
    fps: float,
    seconds: float,
    batcher: EstimateBatcher,
) -> dict:
    """`streams` copies of `source` as `fps` cameras: per stream latency and drops, measured
    for `seconds` after every stream has run LIVE_WARM_UP_S."""
    from stream.hub import StreamHub

    latencies: dict[str, list[float]] = defaultdict(list)
    measuring: list[bool] = []

    def record(stream_id: str, result: FrameResult, at: float) -> None:
        if measuring:
            latencies[stream_id].append((at - result.frame.timestamp) * 1000)

    with StreamHub(config, batcher, on_result=record) as hub:
        for number in range(1, streams + 1):
            hub.add(SimulatedLiveSource(source, fps=fps, loop=True), f"live{number}")
        deadline = time.monotonic() + 120
        while min(s.frames for s in hub.streams()) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(LIVE_WARM_UP_S)
        before = {s.id: (s.frames, s.dropped) for s in hub.streams()}
        measuring.append(True)
        time.sleep(seconds)
        after = {s.id: (s.frames, s.dropped) for s in hub.streams()}
        batch = hub.metrics()["batcher"]
    per_stream = {}
    for stream_id, (frames, dropped) in after.items():
        frames -= before[stream_id][0]
        dropped -= before[stream_id][1]
        per_stream[stream_id] = {
            "frames": frames,
            "dropped": dropped,
            "dropped_pct": round(100 * dropped / max(frames + dropped, 1), 2),
            "capture_to_annotated_ms": percentiles(latencies[stream_id]),
        }
    return {"streams": streams, "input_fps": fps, "seconds": seconds, "per_stream": per_stream,
            "mean_batch": batch["mean_batch"]}  # fmt: skip


def format_streams_results(results: dict) -> str:
    lines = [f"bench --streams on {results['source']} (noisy on a busy machine: compare ratios)"]
    if "file" in results:
        file = results["file"]
        rounds = ", ".join(f"{fps:.1f}" for fps in file["single_fps_per_round"])
        lines.append(f"  single stream (run)  {file['single_fps']:7.1f} FPS (rounds: {rounds})")
        for key, part in file.items():
            if not key.endswith("streams"):
                continue
            ratios = ", ".join(f"{r:.2f}" for r in part["ratio_per_round"])
            lines.append(
                f"  hub, {key:<15} {part['aggregate_fps']:7.1f} FPS aggregate, "
                f"{part['ratio']:.2f}x single (rounds: {ratios}), "
                f"mean batch {part['mean_batch']:.2f} faces"
            )
    if "live" in results:
        live = results["live"]
        lines.append(
            f"  live: {live['streams']} streams at {live['input_fps']:g} FPS for "
            f"{live['seconds']:g} s, mean batch {live['mean_batch']:.2f} faces"
        )
        for stream_id, part in live["per_stream"].items():
            latency = part["capture_to_annotated_ms"]
            lines.append(
                f"    {stream_id:<8} capture to annotated p50 {latency['p50']:6.1f} ms, "
                f"p95 {latency['p95']:6.1f} ms; {part['frames']} processed, "
                f"{part['dropped']} dropped ({part['dropped_pct']:.1f} %)"
            )
    return "\n".join(lines)


def run_streams_bench(config: Config, args: argparse.Namespace) -> int:
    """`bench VIDEO --streams N[,N...] [--live-fps F]`; prints a table, optionally JSON."""
    from estimators import create_estimator
    from stream.batcher import EstimateBatcher

    source = args.source
    if VideoSource(source).spec.kind != "file":
        raise ValueError(f"bench needs a video file, but got {VideoSource(source).source_id}")
    counts = parse_streams(args.streams)
    if args.rounds < 0:
        raise ValueError(f"--rounds must be at least 0, got {args.rounds}")
    if args.cluster:
        return _cluster_bench(config, args, max(counts))
    results: dict = {"source": source}
    estimator = create_estimator(config.estimator, config.models_dir)
    serve = config.serve
    with EstimateBatcher(estimator, serve.max_batch, serve.max_wait_ms) as batcher:
        if args.rounds:
            results["file"] = file_mode(config, source, counts, args.rounds, batcher)
        if args.live_fps:
            results["live"] = live_mode(
                config, source, max(counts), args.live_fps, args.live_seconds, batcher
            )
    print(format_streams_results(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_report(results, args.json)
    return 0


def _cluster_bench(config: Config, args: argparse.Namespace, streams: int) -> int:
    """`bench VIDEO --streams N --cluster HOST:PORT|local`: see stream.reports.cluster_bench."""
    from stream.reports.cluster_bench import cluster_bench, format_cluster_results

    fps = args.live_fps or 15.0
    with tempfile.TemporaryDirectory(prefix="agestream-bench-") as folder:
        results = cluster_bench(
            config, args.source, streams, fps, args.live_seconds, args.cluster,
            args.estimator_service, Path(folder),
        )  # fmt: skip
    print(format_cluster_results(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_report(results, args.json)
    return 0
