"""`agestream bench`: where the time goes, and how much the threaded pipeline gains.

On one file, in one run (so the ratios hold even on a busy machine):

- decode only: how fast frames can be read at all (the bound for any pipeline);
- a naive loop: one thread, the same detector and estimator, one face at a time
  (detect → per face align + estimate with batch 1 → overlay → encode), with
  p50/p95 of each stage;
- the real pipeline (`pipeline.run`, video written to a temporary file), with the
  p50/p95 of the stage timings it reports per frame;
- live: the same file played as a 30 FPS camera (`SimulatedLiveSource`), with
  capture-to-annotated-frame latency p50/p95 and frames dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from stream.config import Config
from stream.sources import SimulatedLiveSource, VideoSource

log = logging.getLogger(__name__)

LIVE_FPS = 30.0
# Live latency is steady-state: the first second pays model warm-up (first inferences
# allocate), which a camera that runs for hours never sees again.
LIVE_WARM_UP_S = 1.0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        nargs="?",
        help="video file to benchmark the pipeline on; without it, --estimator NAME times "
        "that estimator alone at batch 1, 8 and 32",
    )
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--max-frames", type=int, help="use the first N frames of the file (default: all)"
    )
    parser.add_argument(
        "--live-seconds",
        type=float,
        default=10.0,
        help="seconds of simulated 30 FPS live input measured after 1 s of warm-up "
        "(0 skips the live part)",
    )


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p95 of `samples` in their own unit, rounded; NaN when there are none."""
    if not samples:
        return {"p50": float("nan"), "p95": float("nan"), "n": 0}
    p50, p95 = np.percentile(samples, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "n": len(samples)}


def decoded_frames(path: Path) -> int:
    """Frames an mp4 really holds, counted by decoding it."""
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.grab():
        count += 1
    capture.release()
    return count


def decode_only(source: str, max_frames: int | None) -> dict:
    with VideoSource(source) as video:
        started = time.perf_counter()
        frames = 0
        while (max_frames is None or frames < max_frames) and video.read() is not None:
            frames += 1
        elapsed = time.perf_counter() - started
    return {"frames": frames, "fps": round(frames / elapsed, 2)}


def naive_loop(config: Config, source: str, max_frames: int | None, output: Path) -> dict:
    """Everything on one thread, one face per estimator call: the baseline to beat."""
    from detectors import create_detector
    from estimators import create_estimator
    from stream.analyzer import FaceAnalyzer
    from stream.overlay import HudStats, annotate
    from stream.sinks import VideoFileSink
    from stream.types import Estimates, Frame, FrameResult

    stages: dict[str, list[float]] = defaultdict(list)
    with VideoSource(source) as video:
        info = video.info
        with (
            create_detector(config.detector, info.width, config.models_dir) as detector,
            VideoFileSink(output, info.width, info.height, info.fps) as sink,
        ):
            analyzer = FaceAnalyzer(detector, create_estimator(config.estimator, config.models_dir))
            started = time.perf_counter()
            frames = 0
            while max_frames is None or frames < max_frames:
                at = time.perf_counter()
                image = video.read()
                if image is None:
                    break
                stages["decode"].append((time.perf_counter() - at) * 1000)
                timings: dict[str, float] = {}
                image_rgb, faces = analyzer.detect(image, timings)
                stages["detect"].append(timings["detect"])
                per_face = []
                for i in range(len(faces)):
                    per_face.append(analyzer.estimate(image_rgb, faces[i : i + 1], timings))
                    stages["align"].append(timings["align"])
                    stages["estimate per face"].append(timings["estimate"])
                columns = [
                    np.array([getattr(e, name)[0] for e in per_face], np.float32)
                    for name in ("age", "p_male", "age_confidence")
                ]
                estimates = Estimates(*columns)
                frame = Frame(image, frames, time.monotonic(), info.source_id)
                at = time.perf_counter()
                annotated = annotate(
                    FrameResult(frame, faces, estimates, t_ms=frames * 1000 / info.fps),
                    HudStats(frames / max(at - started, 1e-9), info.fps, 0),
                )
                stages["overlay"].append((time.perf_counter() - at) * 1000)
                at = time.perf_counter()
                sink.write(annotated)
                stages["encode"].append((time.perf_counter() - at) * 1000)
                frames += 1
            elapsed = time.perf_counter() - started
    return {
        "frames": frames,
        "fps": round(frames / elapsed, 2),
        "stages_ms": {name: percentiles(samples) for name, samples in stages.items()},
        "frames_written": decoded_frames(output),
    }


def _outputs(config: Config, video: str | None, max_frames: int | None) -> Config:
    """`config` writing only `video` (no window, no JSON lines), stopping after `max_frames`."""
    output = dataclasses.replace(
        config.output, window=False, video=video, json=None, max_frames=max_frames
    )
    return dataclasses.replace(config, output=output)


def pipeline_file(config: Config, source: str, max_frames: int | None, output: Path) -> dict:
    from stream.pipeline import RunSummary, run

    stages: dict[str, list[float]] = defaultdict(list)

    def record(result, done_at: float) -> None:
        for name, value in result.timings_ms.items():
            stages[name].append(value)

    config = _outputs(config, video=str(output), max_frames=max_frames)
    summary = RunSummary(source_id=source)
    run(config, source, summary, on_result=record)
    return {
        "frames": summary.frames,
        "fps": round(summary.processing_fps, 2),
        "faces": summary.faces,
        "faces_estimated": summary.faces_estimated,
        "stages_ms": {name: percentiles(samples) for name, samples in stages.items()},
        "frames_written": decoded_frames(output),
    }


def pipeline_live(config: Config, source: str, seconds: float) -> dict:
    from stream.pipeline import RunSummary, run

    latencies: list[float] = []
    first: list[float] = []

    def record(result, done_at: float) -> None:
        if not first:
            first.append(result.frame.timestamp)
        if result.frame.timestamp - first[0] >= LIVE_WARM_UP_S:
            latencies.append((done_at - result.frame.timestamp) * 1000)

    frames = max(1, round((seconds + LIVE_WARM_UP_S) * LIVE_FPS))
    config = _outputs(config, video=None, max_frames=frames)
    summary = RunSummary(source_id=source)
    run(config, SimulatedLiveSource(source, fps=LIVE_FPS, loop=True), summary, on_result=record)
    return {
        "input_fps": LIVE_FPS,
        "frames_processed": summary.frames,
        "frames_dropped": summary.dropped,
        "fps": round(summary.processing_fps, 2),
        "capture_to_overlay_ms": percentiles(latencies),
    }


def format_results(results: dict) -> str:
    lines = [f"bench on {results['source']} (noisy on a busy machine: compare ratios)"]
    lines.append(f"  decode only   {results['decode']['fps']:7.1f} FPS (the bound)")
    for key in ("naive", "pipeline"):
        part = results[key]
        lines.append(
            f"  {key:<13} {part['fps']:7.1f} FPS, {part['frames_written']} annotated frames written"
        )
        for name, stat in part["stages_ms"].items():
            lines.append(f"    {name:<18} p50 {stat['p50']:7.2f} ms  p95 {stat['p95']:7.2f} ms")
    lines.append(f"  pipeline / naive: {results['speedup']:.2f}x")
    if "live" in results:
        live = results["live"]
        latency = live["capture_to_overlay_ms"]
        lines.append(
            f"  live {live['input_fps']:.0f} FPS input: capture to overlay"
            f" p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms;"
            f" {live['frames_processed']} processed, {live['frames_dropped']} dropped"
        )
    return "\n".join(lines)


def run_bench(config: Config, args: argparse.Namespace) -> int:
    """Benchmark `args.source`; prints a table and optionally writes JSON. Returns 0."""
    source = args.source
    if VideoSource(source).spec.kind != "file":
        raise ValueError(f"bench needs a video file, but got {VideoSource(source).source_id}")
    results: dict = {"source": source}
    with tempfile.TemporaryDirectory(prefix="agestream-bench-") as scratch:
        log.info("bench: decode only")
        results["decode"] = decode_only(source, args.max_frames)
        log.info("bench: naive loop")
        results["naive"] = naive_loop(config, source, args.max_frames, Path(scratch) / "naive.mp4")
        log.info("bench: pipeline")
        results["pipeline"] = pipeline_file(
            config, source, args.max_frames, Path(scratch) / "pipeline.mp4"
        )
    results["speedup"] = round(results["pipeline"]["fps"] / results["naive"]["fps"], 2)
    if args.live_seconds > 0:
        log.info("bench: live at %.0f FPS for %.0f s", LIVE_FPS, args.live_seconds)
        results["live"] = pipeline_live(config, source, args.live_seconds)
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0
