"""Soak test: a looping simulated live source through the real pipeline, RSS sampled over time.

Not a CI test (tests/test_bench.py runs a ~25 s version). Example, one hour sampled
every minute:

    python tools/soak.py ../shared/data/videos/face_recognition__short_hamilton_clip.mp4 \\
        --duration-s 3600 --every-s 60 --out soak.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from stream.config import Config, load_config
from stream.pipeline import run
from stream.sources import SimulatedLiveSource
from stream.stages import RunSummary

log = logging.getLogger("soak")


def rss_mb() -> float:
    """This process's resident memory now (Linux: /proc/self/statm, in pages)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(config: Config, clip: str, duration_s: float, every_s: float, fps: float = 30.0) -> dict:
    """Run for `duration_s`, sampling this process's RSS every `every_s`; returns the record."""
    if not 0 < every_s <= duration_s:
        raise ValueError(f"soak needs 0 < every_s <= duration_s, but got {every_s}, {duration_s}")
    source = SimulatedLiveSource(clip, fps=fps, loop=True)
    output = dataclasses.replace(
        config.output, window=False, video=None, json=None, max_frames=None
    )
    config = dataclasses.replace(config, output=output)
    summary = RunSummary(source_id=clip)
    samples: list[dict] = []
    started = time.monotonic()

    def sample() -> None:
        while not source.stop_event.wait(every_s):
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "rss_mb": round(rss_mb(), 1),
                    "frames": summary.frames,
                }
            )
            log.info("soak: %s", samples[-1])
            if time.monotonic() - started >= duration_s:
                source.stop_event.set()  # ends the run like a signal would

    sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
    sampler.start()
    run(config, source, summary)
    sampler.join(timeout=every_s + 1)
    return {
        "clip": clip,
        "fps": fps,
        "duration_s": round(time.monotonic() - started, 1),
        "frames": summary.frames,
        "dropped": summary.dropped,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="video file, played in a loop as a live camera")
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--every-s", type=float, default=60.0, help="RSS sampling period")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--out", type=Path, default=Path("soak.json"), help="JSON record")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    record = soak(load_config(args.config), args.clip, args.duration_s, args.every_s)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    rss = [s["rss_mb"] for s in record["samples"]]
    print(f"{record['frames']} frames, RSS {rss[0]} -> {rss[-1]} MB (max {max(rss)}); {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
