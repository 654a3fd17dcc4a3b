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

The naive loop and the pipeline alternate for a few rounds and the ratio is the median of
the rounds' ratios: a burst of load from elsewhere then skews one round, not the result.
Both rates are steady-state, counted from the frame after the warm-up frames.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from stream.config import Config, apply_file
from stream.outputs import write_report
from stream.sources import SimulatedLiveSource, VideoSource

if TYPE_CHECKING:
    from stream.types import FrameResult

log = logging.getLogger(__name__)

LIVE_FPS = 30.0
# Live latency is steady-state: the first second pays model warm-up (first inferences
# allocate), which a camera that runs for hours never sees again.
LIVE_WARM_UP_S = 1.0
# Likewise for files: the first second of a 30 FPS clip pays it, in both loops alike. Runs
# shorter than twice this skip their first half instead.
WARM_UP_FRAMES = 30


def percentiles(samples: list[float]) -> dict[str, float]:
    """p50 and p95 of `samples` in their own unit, rounded; NaN when there are none."""
    if not samples:
        return {"p50": float("nan"), "p95": float("nan"), "n": 0}
    p50, p95 = np.percentile(samples, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2), "n": len(samples)}


def steady_rates(done_at: list[float], cpu_at: list[float]) -> tuple[float, float]:
    """Frames per second and CPU cores kept busy, after the warm-up, from each frame's
    completion time and the process's CPU time then; NaN for runs too short to tell."""
    skip = min(WARM_UP_FRAMES, len(done_at) // 2)
    if len(done_at) - skip < 2:
        return float("nan"), float("nan")
    wall = max(done_at[-1] - done_at[skip], 1e-9)
    return (len(done_at) - 1 - skip) / wall, (cpu_at[-1] - cpu_at[skip]) / wall


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


# Frames held in memory for the encode comparison: enough that the encoders' set-up costs
# are a small part, within a memory budget (720p: 240 frames, 660 MB; 4K: 28).
ENCODE_FRAMES = 240
ENCODE_MEMORY_BYTES = 700 * 2**20


def _encode_cpu_ms(write_all: Callable[[list[np.ndarray]], None], images: list) -> float:
    """CPU milliseconds per frame (all threads: x264 encodes on several) to encode `images`."""
    started = time.process_time()
    write_all(images)
    return (time.process_time() - started) * 1000 / len(images)


def encode_costs(source: str, scratch: Path, rounds: int) -> dict:
    """CPU per frame of the video output (H.264 fragmented MP4, PyAV) against the OpenCV
    mp4v writer agestream used before it, alternating, on the file's first frames."""
    from stream.sinks import VideoFileSink

    images = []
    with VideoSource(source) as video:
        while (image := video.read()) is not None:
            images.append(image)
            if len(images) >= min(ENCODE_FRAMES, ENCODE_MEMORY_BYTES // image.nbytes):
                break
    height, width = images[0].shape[:2]
    fps = 30.0

    def h264(frames: list[np.ndarray]) -> None:
        with VideoFileSink(scratch / "h264.mp4", width, height, fps) as sink:
            for image in frames:
                sink.write(image)

    def mp4v(frames: list[np.ndarray]) -> None:
        writer = cv2.VideoWriter(
            str(scratch / "mp4v.mp4"), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height)
        )
        for image in frames:
            writer.write(image)
        writer.release()

    costs: dict[str, list[float]] = {"h264": [], "mp4v": []}
    for _ in range(rounds):
        costs["h264"].append(_encode_cpu_ms(h264, images))
        costs["mp4v"].append(_encode_cpu_ms(mp4v, images))
    ratios = [new / old for new, old in zip(costs["h264"], costs["mp4v"])]
    return {
        "frames": len(images),
        "h264_cpu_ms": round(float(np.median(costs["h264"])), 2),
        "mp4v_cpu_ms": round(float(np.median(costs["mp4v"])), 2),
        "ratio": round(float(np.median(ratios)), 2),
    }


@dataclasses.dataclass(frozen=True)
class LoopRun:
    """One run of the naive loop or of the pipeline on the file."""

    frames: int
    fps: float
    cores_busy: float
    frames_written: int
    stage_samples: dict[str, list[float]]
    faces_estimated: int | None = None


def naive_loop(config: Config, source: str, max_frames: int | None, output: Path) -> LoopRun:
    """Every stage in turn on the calling thread, one face per estimator call: the baseline."""
    from detectors import create_detector
    from estimators import create_estimator
    from stream.analyzer import FaceAnalyzer
    from stream.overlay import HudStats, annotate
    from stream.sinks import VideoFileSink
    from stream.types import Estimates, Frame, FrameResult

    stages: dict[str, list[float]] = defaultdict(list)
    done_at: list[float] = []
    cpu_at: list[float] = []
    with VideoSource(source) as probe:
        info = probe.info
    # The loop as a user would write it: OpenCV as it comes, with its own thread pool and
    # FFmpeg's decoding threads, none of the pipeline's tuning for sharing the cores.
    capture = cv2.VideoCapture(source)
    try:
        with (
            create_detector(config.detector, info.width, config.models_dir) as detector,
            VideoFileSink(output, info.width, info.height, info.fps) as sink,
        ):
            analyzer = FaceAnalyzer(detector, create_estimator(config.estimator, config.models_dir))
            started = time.perf_counter()
            frames = 0
            while max_frames is None or frames < max_frames:
                at = time.perf_counter()
                ok, image = capture.read()
                if not ok:
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
                age, p_male, age_confidence = (
                    np.array([getattr(e, name)[0] for e in per_face], np.float32)
                    for name in ("age", "p_male", "age_confidence")
                )
                estimates = Estimates(age, p_male, age_confidence)
                frame = Frame(image, frames, time.monotonic(), info.source_id)
                at = time.perf_counter()
                annotated = annotate(
                    FrameResult(frame, faces, estimates, t_ms=frames * 1000 / info.fps),
                    HudStats(frames / max(at - started, 1e-9), info.fps, 0),
                )
                stages["overlay"].append((time.perf_counter() - at) * 1000)
                at = time.perf_counter()
                sink.write(annotated)
                done_at.append(time.perf_counter())
                cpu_at.append(time.process_time())
                stages["encode"].append((done_at[-1] - at) * 1000)
                frames += 1
    finally:
        capture.release()
    return LoopRun(frames, *steady_rates(done_at, cpu_at), decoded_frames(output), stages)


def _outputs(config: Config, video: str | None, max_frames: int | None) -> Config:
    """`config` writing only `video` (no window, no JSON lines), stopping after `max_frames`."""
    output = dataclasses.replace(
        config.output, window=False, video=video, json=None, max_frames=max_frames
    )
    return dataclasses.replace(config, output=output)


def pipeline_file(config: Config, source: str, max_frames: int | None, output: Path) -> LoopRun:
    from stream.pipeline import run
    from stream.stages import RunSummary

    stages: dict[str, list[float]] = defaultdict(list)
    done_at: list[float] = []
    cpu_at: list[float] = []

    def record(result: FrameResult, at: float) -> None:
        done_at.append(at)
        cpu_at.append(time.process_time())
        for name, value in result.timings_ms.items():
            stages[name].append(value)

    config = _outputs(config, video=str(output), max_frames=max_frames)
    summary = RunSummary(source_id=source)
    run(config, source, summary, on_result=record)
    return LoopRun(
        summary.frames,
        *steady_rates(done_at, cpu_at),
        decoded_frames(output),
        stages,
        summary.faces_estimated,
    )


def combine(runs: list[LoopRun]) -> dict:
    """Rounds of one loop: median FPS, every round's frame counts, stage samples pooled."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for loop_run in runs:
        for name, samples in loop_run.stage_samples.items():
            pooled[name].extend(samples)
    combined = {
        "frames": runs[0].frames,
        "fps": round(float(np.median([loop_run.fps for loop_run in runs])), 2),
        "fps_per_round": [round(loop_run.fps, 2) for loop_run in runs],
        "cores_busy": round(float(np.median([loop_run.cores_busy for loop_run in runs])), 2),
        "frames_written": [loop_run.frames_written for loop_run in runs],
        "stages_ms": {name: percentiles(samples) for name, samples in pooled.items()},
    }
    if runs[0].faces_estimated is not None:
        combined["faces_estimated"] = runs[0].faces_estimated
    return combined


def pipeline_live(config: Config, source: str, seconds: float) -> dict:
    from stream.pipeline import run
    from stream.stages import RunSummary

    latencies: list[float] = []
    first: list[float] = []

    def record(result: FrameResult, done_at: float) -> None:
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


def _frames_written(counts: list[int]) -> str:
    if len(set(counts)) == 1:
        return f"{counts[0]} annotated frames written" + (" each round" if len(counts) > 1 else "")
    return f"annotated frames written per round: {counts}"


def format_results(results: dict) -> str:
    lines = [f"bench on {results['source']} (noisy on a busy machine: compare ratios)"]
    lines.append(f"  decode only   {results['decode']['fps']:7.1f} FPS (the bound)")
    for key in ("naive", "pipeline", "baseline"):
        if key not in results:
            continue
        part = results[key]
        rounds = ", ".join(f"{fps:.1f}" for fps in part["fps_per_round"])
        lines.append(
            f"  {key:<13} {part['fps']:7.1f} FPS (rounds: {rounds}),"
            f" {part['cores_busy']:.2f} CPU cores busy, {_frames_written(part['frames_written'])}"
        )
        for name, stat in part["stages_ms"].items():
            lines.append(f"    {name:<18} p50 {stat['p50']:7.2f} ms  p95 {stat['p95']:7.2f} ms")
    ratios = ", ".join(f"{ratio:.2f}" for ratio in results["speedup_per_round"])
    lines.append(f"  pipeline / naive: {results['speedup']:.2f}x (median of rounds: {ratios})")
    if "baseline" in results:
        ratios = ", ".join(f"{r:.3f}" for r in results["pipeline_vs_baseline_per_round"])
        lines.append(
            f"  pipeline / baseline ({results['baseline']['changes']}):"
            f" {results['pipeline_vs_baseline']:.3f}x (median of rounds: {ratios})"
        )
    encode = results["encode"]
    lines.append(
        f"  video encode CPU per frame ({encode['frames']} frames): H.264 fragmented MP4"
        f" {encode['h264_cpu_ms']:.2f} ms, OpenCV mp4v (before) {encode['mp4v_cpu_ms']:.2f} ms,"
        f" ratio {encode['ratio']:.2f}"
    )
    if "live" in results:
        live = results["live"]
        latency = live["capture_to_overlay_ms"]
        lines.append(
            f"  live {live['input_fps']:.0f} FPS input: capture to overlay"
            f" p50 {latency['p50']:.1f} ms, p95 {latency['p95']:.1f} ms;"
            f" {live['frames_processed']} processed, {live['frames_dropped']} dropped"
        )
    return "\n".join(lines)


def baseline_results(path: str, runs: list[LoopRun], baseline_runs: list[LoopRun]) -> dict:
    """The baseline pipeline's figures and pipeline / baseline FPS, per round and median."""
    ratios = [run.fps / base.fps for run, base in zip(runs, baseline_runs)]
    return {
        "baseline": combine(baseline_runs) | {"changes": str(path)},
        "pipeline_vs_baseline_per_round": [round(ratio, 3) for ratio in ratios],
        "pipeline_vs_baseline": round(float(np.median(ratios)), 3),
    }


def run_bench(config: Config, args: argparse.Namespace) -> int:
    """Benchmark `args.source`; prints a table and optionally writes JSON. Returns 0."""
    if getattr(args, "streams", None):
        from stream.reports.streams_bench import run_streams_bench

        return run_streams_bench(config, args)
    source = args.source
    if VideoSource(source).spec.kind != "file":
        raise ValueError(f"bench needs a video file, but got {VideoSource(source).source_id}")
    if args.rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    baseline = apply_file(config, args.baseline) if getattr(args, "baseline", None) else None
    results: dict = {"source": source}
    naive_runs: list[LoopRun] = []
    pipeline_runs: list[LoopRun] = []
    baseline_runs: list[LoopRun] = []
    with tempfile.TemporaryDirectory(prefix="agestream-bench-") as scratch:
        log.info("bench: decode only")
        results["decode"] = decode_only(source, args.max_frames)
        log.info("bench: video encode, H.264 against OpenCV mp4v")
        results["encode"] = encode_costs(source, Path(scratch), args.rounds)
        for round_number in range(1, args.rounds + 1):
            log.info("bench: round %d of %d: naive loop", round_number, args.rounds)
            naive_runs.append(
                naive_loop(config, source, args.max_frames, Path(scratch) / "naive.mp4")
            )
            log.info("bench: round %d of %d: pipeline", round_number, args.rounds)
            pipeline_runs.append(
                pipeline_file(config, source, args.max_frames, Path(scratch) / "pipeline.mp4")
            )
            if baseline is not None:
                log.info("bench: round %d of %d: baseline pipeline", round_number, args.rounds)
                baseline_runs.append(
                    pipeline_file(baseline, source, args.max_frames, Path(scratch) / "base.mp4")
                )
    results["naive"] = combine(naive_runs)
    results["pipeline"] = combine(pipeline_runs)
    if baseline_runs:
        results.update(baseline_results(args.baseline, pipeline_runs, baseline_runs))
    ratios = [piped.fps / naive.fps for naive, piped in zip(naive_runs, pipeline_runs)]
    results["speedup_per_round"] = [round(ratio, 2) for ratio in ratios]
    results["speedup"] = round(float(np.median(ratios)), 2)
    if args.live_seconds > 0:
        log.info("bench: live at %.0f FPS for %.0f s", LIVE_FPS, args.live_seconds)
        results["live"] = pipeline_live(config, source, args.live_seconds)
    print(format_results(results), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_report(results, args.json)
    return 0
