"""Who is who, measured: builds the clips of tests/clips.py, runs `agestream run` on them and on
every shared clip, and tabulates per clip the true people against the person ids the run gave
(merges, splits), short tracks, age-group flicker, children shown with an adult's age and
frames with a face shown.

    python tools/identity_table.py [--out DIR] [--config FILE] [--only NAME...] [--json FILE|-]

The `stream` package this interpreter imports is the one measured (it is run as `python -m
stream` from its own checkout): set PYTHONPATH to measure another checkout, e.g. a worktree
of an earlier commit with this repository's tests/clips.py copied into it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: a checkout named there wins

import stream  # noqa: E402
from tests.clips import (  # noqa: E402
    HAMILTON,
    NO_ONE,
    Truth,
    children_with_adult_age,
    cuts_clip,
    dressed_alike_clip,
    grid_clip,
    grid_truth,
    holdings,
    leave_and_return_clip,
    leave_and_return_truth,
    merges_and_splits,
    no_face_clip,
    queue_clip,
    shared_truth,
)

SHARED = ROOT.parent / "shared"
VIDEOS, UTKFACE = SHARED / "data" / "videos", SHARED / "data" / "utkface-dev"
# The checkout whose `stream` is measured: `python -m stream` run from there imports it.
MEASURED = Path(stream.__file__).resolve().parents[1]

Build = Callable[[Path], tuple[Path, Truth]]


@dataclass(frozen=True)
class Clip:
    name: str
    label: str
    build: Build


@dataclass(frozen=True)
class Row:
    name: str
    clip: str
    true_people: int
    ids: int
    merges: int | None
    splits: int | None
    missed: int | None
    short_tracks: int
    age_group_changes_per_s: float
    child_with_adult_age: int | None
    frames_with_face: int
    frames: int


def _video(name: str) -> Path:
    return VIDEOS / f"livePortrait__{name}.mp4"


def _shared_clip(path: Path) -> Clip:
    return Clip(path.stem, path.stem, lambda out: (path, shared_truth(path)))


def _grid(name: str, label: str, paths: list[Path]) -> Clip:
    return Clip(name, label, lambda out: (grid_clip(paths, out), grid_truth(paths)))


def _made(name: str, label: str, build: Callable[[Path, Path, Path], tuple[Path, Truth]]) -> Clip:
    return Clip(name, label, lambda out: build(VIDEOS, UTKFACE, out))


def clips() -> list[Clip]:
    """Every shared clip, then the made ones of README's table and the who-is-who ones."""
    shared = sorted(VIDEOS.glob("*.mp4"))
    d19 = _video("driving__d19")
    grid = [_video("driving__d3"), _video("source__s32"), d19, VIDEOS / f"{HAMILTON}.mp4"]
    return [_shared_clip(path) for path in shared] + [
        _grid("grid", "grid: d3, s32, d19, hamilton", grid),
        _grid("pair", "pair: d10, s18", [_video("driving__d10"), _video("source__s18")]),
        Clip(
            "leave_return",
            "leave and return: d19, 3 s away, d19",
            lambda out: (leave_and_return_clip(d19, out), leave_and_return_truth(d19)),
        ),
        Clip(
            "no_face_224",
            "no faces (224 px squares)",
            lambda out: (no_face_clip(shared, out), NO_ONE),
        ),
        Clip(
            "no_face_256",
            "no faces (256 px squares)",
            lambda out: (no_face_clip(shared, out, side=256), NO_ONE),
        ),
        _made("cuts", "cuts: d3, d10, d13, d19, s18, s32, child, d3", cuts_clip),
        _made("queue", "queue: 4 people at one spot, gaps 0/5/15 frames", queue_clip),
        _made("dressed_alike", "dressed alike: 2 people, one body, 2 s apart", dressed_alike_clip),
    ]


def _agestream(*args: str) -> str:
    """`agestream ARGS` of the measured checkout; its stdout (RuntimeError on failure)."""
    command = [sys.executable, "-m", "stream", *args]
    done = subprocess.run(command, cwd=MEASURED, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def run_clip(video: Path, jsonl: Path, config: Path | None) -> tuple[list[dict], dict]:
    """The run's frame records, and `evaluate-video`'s report of them."""
    extra = ["--config", str(config)] if config else []
    _agestream("run", str(video), "--no-window", "--json", str(jsonl), *extra)
    lines = jsonl.read_text().splitlines()
    records = [record for record in map(json.loads, lines) if "faces" in record]
    return records, json.loads(_agestream("evaluate-video", str(jsonl), "--json", "-"))


def measure(clip: Clip, video: Path, truth: Truth, jsonl: Path, config: Path | None) -> Row:
    """One clip's row: its run scored against its truth."""
    records, report = run_clip(video, jsonl, config)
    held = holdings(records, truth)
    scores = (None,) * 3 if truth.count_only else merges_and_splits(held, truth)
    shown = [r for r in records if any(face["track"] is not None for face in r["faces"])]
    return Row(
        name=clip.name,
        clip=clip.label,
        true_people=truth.people_count,
        ids=len(held),
        merges=scores[0],
        splits=scores[1],
        missed=scores[2],
        short_tracks=report["short_tracks"],
        age_group_changes_per_s=round(report["age_group_changes_per_s"]["smoothed"], 3),
        child_with_adult_age=children_with_adult_age(records, truth),
        frames_with_face=len(shown),
        frames=len(records),
    )


def measure_all(chosen: list[Clip], folder: Path, config: Path | None, jobs: int) -> list[Row]:
    """Builds the clips one by one (each loads its own detector), then runs them `jobs` at
    a time (each run is a process of its own)."""
    built = [(clip, *clip.build(folder / f"{clip.name}.mp4")) for clip in chosen]
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        runs = [
            pool.submit(measure, clip, video, truth, folder / f"{clip.name}.jsonl", config)
            for clip, video, truth in built
        ]
        return [run.result() for run in runs]


HEADER = (
    "| clip | true people | ids | merges | splits | people without an id | tracks < 1 s | "
    "age-group changes per track-second (smoothed) | child shown with adult age (frames) | "
    "frames with a face shown |"
)


def markdown(rows: list[Row]) -> str:
    def cell(value: object) -> str:
        return "-" if value is None else str(value)

    lines = [HEADER, "|" + " --- |" * HEADER.count(" |")]
    for row in rows:
        values = (
            row.clip, row.true_people, row.ids, row.merges, row.splits, row.missed,
            row.short_tracks, f"{row.age_group_changes_per_s:.2f}", row.child_with_adult_age,
            f"{row.frames_with_face} of {row.frames}",
        )  # fmt: skip
        lines.append("| " + " | ".join(map(cell, values)) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the clips and runs (default: temp)")
    parser.add_argument("--config", type=Path, help="agestream config for every run")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="only these clips: a shared clip's file stem, grid, pair, leave_return, "
        "no_face_224, no_face_256, cuts, queue or dressed_alike",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (- stdout)")
    parser.add_argument("--jobs", type=int, default=2, help="clips measured at once")
    args = parser.parse_args(argv)
    names = [clip.name for clip in clips()]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown clip {', '.join(unknown)}, expecting some of: {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [clip for clip in clips() if not args.only or clip.name in args.only]
    print(f"measuring {MEASURED} ({len(chosen)} clips)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as temp:
        # Absolute: the runs start in the measured checkout, not here.
        folder = (args.out or Path(temp)).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        config = args.config.resolve() if args.config else None
        rows = measure_all(chosen, folder, config, args.jobs)
    table = markdown(rows)
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps([asdict(row) for row in rows], indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
