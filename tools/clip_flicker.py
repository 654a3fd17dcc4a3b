"""Label flicker of an estimator over every shared clip: `agestream run` each clip with a
config, then `agestream evaluate-video`, summed over the clips (changes per track-second); and
how many shown faces get a gender, "unsure" or no label yet.

    python tools/clip_flicker.py OUT_DIR [--config CONFIG.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stream.cli import main as agestream  # noqa: E402
from stream.reports.flicker import flicker_report  # noqa: E402

CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for each clip's JSON lines")
    parser.add_argument("--config", help="agestream config, e.g. another estimator model")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    totals = {"track_seconds": 0.0, "age_changes": 0, "gender_changes": 0, "tracks": 0}
    genders: Counter[str] = Counter()
    for clip in sorted(CLIPS.glob("*.mp4")):
        jsonl = args.out / f"{clip.stem}.jsonl"
        extra = ["--config", args.config] if args.config else []
        if agestream(["run", str(clip), "--no-window", "--json", str(jsonl), *extra]) != 0:
            raise SystemExit(f"run failed on {clip}")
        report = flicker_report(jsonl)
        genders.update(shown_genders(jsonl))
        tracks = report["per_track"]
        totals["track_seconds"] += report["track_seconds"]
        totals["tracks"] += report["tracks"]
        totals["age_changes"] += sum(track["age_changes_smoothed"] for track in tracks)
        totals["gender_changes"] += sum(track["gender_changes_smoothed"] for track in tracks)
    seconds = totals["track_seconds"]
    totals["age_changes_per_s"] = totals["age_changes"] / seconds if seconds else None
    totals["gender_changes_per_s"] = totals["gender_changes"] / seconds if seconds else None
    totals["faces_shown"] = dict(genders)
    print(json.dumps(totals, indent=2))


def shown_genders(jsonl: Path) -> Counter[str]:
    """How many faces of a run's JSON lines show each gender label ("none": no label yet)."""
    counts: Counter[str] = Counter()
    for line in jsonl.read_text().splitlines():
        for face in json.loads(line).get("faces", []):
            counts[face.get("gender") or "none"] += 1
    return counts


if __name__ == "__main__":
    main()
