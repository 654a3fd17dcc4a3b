"""Compare stream.tracking.Tracker with supervision's ByteTrack and norfair on recorded detections.

Reads the JSON lines that `agestream run --json` writes (only `t_ms` and each face's
`box` and `score` are used), replays them through each tracker with comparable settings
(1 s lifetime at the clip's FPS, IoU threshold 0.3, confirmed after 3 hits) and prints,
per clip and tracker, ID counts, an ID-switch proxy, faces without an ID and the time
per update; then each library's install footprint beyond the packages agestream has.
A library that is not installed is skipped with a note. Example:

    /tmp/venv/bin/agestream run clip.mp4 --no-window --json /tmp/trk_clip.jsonl
    python tools/compare_trackers.py /tmp/trk_*.jsonl

sv.ByteTrack was removed in supervision 0.31 (moved to the `trackers` package): use
supervision<0.31. norfair needs numpy<2.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream.tracking import Tracker, iou_matrix  # noqa: E402
from stream.types import Faces  # noqa: E402

# One tracker step: (n, 4) float32 boxes and (n,) scores in, (n,) shown ids out (-1: none).
Step = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Builds a fresh Step for a clip: (fps, lifetime_s, iou_threshold, min_hits).
Factory = Callable[[float, float, float, int], Step]


@dataclass(frozen=True)
class Clip:
    name: str
    fps: float
    boxes: list[np.ndarray]
    scores: list[np.ndarray]


def load_clip(path: Path) -> Clip:
    boxes, scores, times = [], [], []
    with path.open() as lines:
        for line in lines:
            record = json.loads(line)
            times.append(record["t_ms"])
            faces = record["faces"]
            boxes.append(np.array([f["box"] for f in faces], np.float32).reshape(-1, 4))
            scores.append(np.array([f["score"] for f in faces], np.float32))
    if len(times) < 2:
        raise ValueError(f"{path} needs at least 2 frames, but has {len(times)}")
    fps = 1000.0 / float(np.median(np.diff(times)))
    return Clip(path.stem.removeprefix("trk_"), fps, boxes, scores)


def ours(fps: float, lifetime_s: float, iou_threshold: float, min_hits: int) -> Step:
    tracker = Tracker(fps, lifetime_s=lifetime_s, iou_threshold=iou_threshold, min_hits=min_hits)

    def step(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        faces = Faces(boxes, scores, np.zeros((len(boxes), 6, 2), np.float32))
        update = tracker.update(faces)
        return np.where(update.confirmed, update.track_ids, -1)

    return step


def bytetrack(fps: float, lifetime_s: float, iou_threshold: float, min_hits: int) -> Step:
    import supervision as sv

    tracker = sv.ByteTrack(
        frame_rate=fps,
        lost_track_buffer=round(30 * lifetime_s),  # counted in 30 FPS frames, scaled by frame_rate
        minimum_matching_threshold=1 - iou_threshold,  # a cost: 1 - IoU * score
        minimum_consecutive_frames=min_hits,
    )

    def step(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        detections = sv.Detections(
            xyxy=boxes,
            confidence=scores,
            class_id=np.zeros(len(boxes), int),
            data={"index": np.arange(len(boxes))},
        )
        tracked = tracker.update_with_detections(detections)
        ids = np.full(len(boxes), -1, np.int64)
        if len(tracked):  # only faces with a confirmed track come back
            ids[tracked.data["index"]] = tracked.tracker_id
        return ids

    return step


def norfair_iou(fps: float, lifetime_s: float, iou_threshold: float, min_hits: int) -> Step:
    import norfair

    tracker = norfair.Tracker(
        distance_function="iou",  # 1 - IoU
        distance_threshold=1 - iou_threshold,
        hit_counter_max=max(1, round(lifetime_s * fps)),  # frames a well-seen track survives unseen
        initialization_delay=min_hits - 1,  # shown once the hit counter exceeds it
    )

    def step(boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        detections = [
            norfair.Detection(box.reshape(2, 2), np.repeat(score, 2), data=i)
            for i, (box, score) in enumerate(zip(boxes, scores))
        ]
        ids = np.full(len(boxes), -1, np.int64)
        for tracked in tracker.update(detections):  # confirmed tracks, matched or coasting
            if any(tracked.last_detection is d for d in detections):
                ids[tracked.last_detection.data] = tracked.id
        return ids

    return step


TRACKERS: dict[str, tuple[str | None, Factory]] = {
    "agestream": (None, ours),
    "sv.ByteTrack": ("supervision", bytetrack),
    "norfair": ("norfair", norfair_iou),
}


@dataclass(frozen=True)
class Result:
    ids: int
    short_ids: int
    id_changes: int
    faces: int
    without_id: int
    us_per_update: float


def evaluate(clip: Clip, factory: Factory, args: argparse.Namespace) -> Result:
    """Replay `clip` `args.repeats` times; metrics from the first run, the best mean time."""
    times = []
    for _ in range(args.repeats):
        step = factory(clip.fps, args.lifetime_s, args.iou_threshold, args.min_hits)
        frame_ids = []
        start = time.perf_counter()
        for boxes, scores in zip(clip.boxes, clip.scores):
            frame_ids.append(step(boxes, scores))
        times.append((time.perf_counter() - start) / len(clip.boxes) * 1e6)
        if len(times) == 1:
            ids_per_frame = frame_ids
    spans: dict[int, list[int]] = {}
    id_changes = 0
    for t, ids in enumerate(ids_per_frame):
        for i in ids[ids >= 0]:
            spans.setdefault(int(i), [t, t])[1] = t
        if t == 0 or not len(clip.boxes[t]) or not len(clip.boxes[t - 1]):
            continue
        # ID-switch proxy: a face overlapping (IoU > 0.5) a face of the previous frame, both
        # with an ID, but not the same one.
        overlaps = iou_matrix(clip.boxes[t], clip.boxes[t - 1])
        for f, previous in enumerate(overlaps.argmax(axis=1)):
            before, now = ids_per_frame[t - 1][previous], ids[f]
            if overlaps[f, previous] > 0.5 and before >= 0 and now >= 0 and before != now:
                id_changes += 1
    min_frames = round(clip.fps * 1.0)
    faces = sum(len(ids) for ids in ids_per_frame)
    return Result(
        ids=len(spans),
        short_ids=sum(last - first + 1 < min_frames for first, last in spans.values()),
        id_changes=id_changes,
        faces=faces,
        without_id=sum(int((ids < 0).sum()) for ids in ids_per_frame),
        us_per_update=min(times),
    )


def dist_size(dist: metadata.Distribution) -> int:
    """Bytes on disk of a distribution's recorded files, plus __pycache__ next to them."""
    paths = {Path(dist.locate_file(f)) for f in dist.files or ()}
    caches = {p.parent / "__pycache__" for p in paths if p.suffix == ".py"}
    paths |= {c for cache in caches if cache.is_dir() for c in cache.iterdir()}
    return sum(p.stat().st_size for p in paths if p.is_file())


def footprint(package: str, have: set[str]) -> tuple[int, list[str], list[str]]:
    """(bytes, new distributions, requirements on `have`) of `package` and its dependencies."""
    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return name.lower().replace("_", "-")

    seen: set[str] = set()
    on_have: list[str] = []
    todo = [package]
    size = 0
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        size += dist_size(dist)
        for text in dist.requires or ():
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            if canonical(requirement.name) in have:
                on_have.append(f"{dist.metadata['Name']}: {requirement}")
            else:
                todo.append(requirement.name)
    return size, sorted(seen), on_have


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="files from `agestream run --json`")
    parser.add_argument("--lifetime-s", type=float, default=1.0)
    parser.add_argument("--iou-threshold", type=float, default=0.3)
    parser.add_argument("--min-hits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs per clip; best time kept")
    parser.add_argument(
        "--have",
        nargs="*",
        default=["numpy", "opencv-python", "opencv-contrib-python"],
        help="packages agestream already installs, left out of the footprints",
    )
    args = parser.parse_args()

    trackers: dict[str, Factory] = {}
    for label, (module, factory) in TRACKERS.items():
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                print(f"note: {module} not installed, skipping {label}")
                continue
        trackers[label] = factory

    columns = ("IDs", 4), ("<1s", 4), ("switch", 6), ("no ID", 11), ("µs/upd", 7)
    header = f"{'clip':40} {'tracker':13} " + " ".join(f"{n:>{w}}" for n, w in columns)
    print(header)
    print("-" * len(header))
    for path in args.jsonl:
        clip = load_clip(path)
        for label, factory in trackers.items():
            r = evaluate(clip, factory, args)
            without = f"{r.without_id}/{r.faces}"
            print(
                f"{clip.name:40} {label:13} {r.ids:4} {r.short_ids:4} {r.id_changes:6}"
                f" {without:>11} {r.us_per_update:7.0f}"
            )

    have = {name.lower() for name in args.have}
    print("\ninstall footprint beyond", ", ".join(sorted(have)))
    for label, (module, _) in TRACKERS.items():
        if module is None or label not in trackers:
            continue
        size, dists, on_have = footprint(module, have)
        version = metadata.version(module)
        print(f"{label} ({module} {version}): {size / 2**20:.1f} MiB in {len(dists)} distributions")
        print("  " + ", ".join(dists))
        if on_have:
            print("  needs: " + "; ".join(on_have))


if __name__ == "__main__":
    main()
