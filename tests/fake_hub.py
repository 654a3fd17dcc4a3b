"""A stand-in for stream.hub.StreamHub with its exact methods: generated JPEG frames, made-up
statuses and counts of visits held in memory, no sources or models, for the web app's tests."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import Counter

import cv2
import numpy as np

from stream.config import StreamEntry
from stream.types import CountRow, StreamIdInUse, StreamStatus, TrackStatus, Visit

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PERIOD_SECONDS = {"hour": 3600, "day": 86400}


class FakeStream:
    """One made-up stream: frame n is drawn when asked for, at `fps` frames per second."""

    def __init__(self, stream_id: str, source: str, fps: float, size: tuple[int, int]) -> None:
        self.id = stream_id
        self.source = source
        self.fps = fps
        self.size = size
        self.started = time.monotonic()
        self.cached: tuple[int, bytes] | None = None
        self.encoded = 0  # frames JPEG-encoded (what viewers asked for)
        self.last: int | None = None  # a file's last frame: the stream ends there

    def sequence(self) -> int:
        running = int((time.monotonic() - self.started) * self.fps)
        return running if self.last is None else min(running, self.last)

    def jpeg(self, sequence: int) -> bytes:
        if self.cached is None or self.cached[0] != sequence:
            width, height = self.size
            x = np.linspace(0, 255, width, dtype=np.float32)
            image: np.ndarray = np.empty((height, width, 3), np.uint8)
            image[:] = np.stack([x, x[::-1], np.full_like(x, (sequence * 7) % 256)], -1)
            # Noise keeps the JPEG large enough for a stalled viewer to fill socket buffers.
            noise = np.random.default_rng(sequence).integers(0, 40, (height, width, 3), np.uint8)
            image = cv2.add(image, noise)
            box = (sequence * 9) % max(1, width - 60)
            cv2.rectangle(image, (box, height // 3), (box + 60, height // 3 + 60), (0, 255, 0), 3)
            cv2.putText(
                image, f"{self.id} #{sequence}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8,
                (255, 255, 255), 2,
            )  # fmt: skip
            ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            self.cached = (sequence, data.tobytes())
            self.encoded += 1
        return self.cached[1]

    def status(self) -> StreamStatus:
        age = time.monotonic() - self.started
        tracks = (
            TrackStatus(1, 34.4, 1.6, "female", 0.93, round(age, 1), 28.0, 41.5),
            TrackStatus(2, 61.0, None, "unsure", None, round(age / 2, 1)),
            TrackStatus(3, None, None, None, None, 0.4),
        )
        return StreamStatus(
            id=self.id,
            source=self.source,
            state="ended" if self.sequence() == self.last else "running",
            fps=self.fps,
            faces=len(tracks),
            tracks=tracks,
            dropped=int(age),
            frames=self.sequence() + 1,
            latency_ms_p95=42.5,
        )


class FakeHub:
    """StreamHub's interface over FakeStreams. Sources starting with "bad:" are refused."""

    def __init__(self, fps: float = 20.0, size: tuple[int, int] = (320, 180)) -> None:
        self.fps = fps
        self.size = size
        self.lock = threading.Lock()
        self.items: dict[str, FakeStream] = {}
        self.entries: dict[str, StreamEntry | None] = {}  # what each POST placed it by
        self.removed: list[str] = []
        self.visits: list[Visit] = []  # the visits store: what counts() counts
        self.closed = False

    def streams(self) -> list[StreamStatus]:
        with self.lock:
            return [stream.status() for stream in self.items.values()]

    def status(self, stream_id: str) -> StreamStatus:
        with self.lock:
            return self.items[stream_id].status()

    def add(
        self, source: str, stream_id: str | None = None, entry: StreamEntry | None = None
    ) -> StreamStatus:
        if not source or source.startswith("bad:"):
            raise ValueError(f"cannot open {source!r}: not a webcam index, URL or video file")
        with self.lock:
            if stream_id is None:
                stream_id = next(f"cam{n}" for n in range(1, 10_000) if f"cam{n}" not in self.items)
            if not ID_PATTERN.fullmatch(stream_id):
                raise ValueError(f"invalid stream id {stream_id!r}: use letters, digits, _ . -")
            if stream_id in self.items:
                raise StreamIdInUse(f"stream id {stream_id!r} is already in use")
            stream = FakeStream(stream_id, source, self.fps, self.size)
            self.items[stream_id] = stream
            self.entries[stream_id] = entry
            return dataclasses.replace(stream.status(), state="starting")  # as the hub does

    def remove(self, stream_id: str) -> None:
        with self.lock:
            del self.items[stream_id]
            self.removed.append(stream_id)
        time.sleep(0.05)  # the real one finalizes outputs

    def latest_jpeg(self, stream_id: str, after: int = -1) -> tuple[int, bytes] | None:
        with self.lock:
            stream = self.items[stream_id]
            sequence = stream.sequence()
            if sequence <= after:
                return None
            return sequence, stream.jpeg(sequence)

    def add_visit(
        self, camera: str, first_seen: float, age: float | None, gender: str | None
    ) -> None:
        """Stores a finished 10-s visit of a new person to `camera`."""
        with self.lock:
            person = len(self.visits) + 1
            self.visits.append(
                Visit(camera, "fake-run", person, first_seen, first_seen + 10.0, age, None, None,
                      gender, None, True)
            )  # fmt: skip

    def counts(
        self, start: float, end: float, camera: str | None = None, by: str = "hour"
    ) -> list[CountRow]:
        """People first seen in [start, end), per `by` period (UTC), camera, age group and
        gender, as the visits store counts them."""
        if by not in PERIOD_SECONDS:
            raise ValueError(f"invalid period {by!r}, expecting hour or day")
        if not start < end:
            raise ValueError(f"start ({start}) must be before end ({end})")
        period = PERIOD_SECONDS[by]
        with self.lock:
            visits = list(self.visits)
        tally: Counter[tuple[str, float, str, str]] = Counter(
            (visit.camera, visit.first_seen // period * period, visit.age_group,
             visit.counted_gender)
            for visit in visits
            if start <= visit.first_seen < end and camera in (None, visit.camera)
        )  # fmt: skip
        return [
            CountRow(name, period_start, by, age_group, gender, people)
            for (name, period_start, age_group, gender), people in sorted(tally.items())
        ]

    def cameras(self) -> list[str]:
        """Every camera with a stored visit and every stream now served, sorted."""
        with self.lock:
            return sorted({visit.camera for visit in self.visits} | set(self.items))

    def metrics(self) -> dict:
        streams = self.streams()
        return {
            "streams": [
                {
                    "id": s.id,
                    "frames": s.frames,
                    "dropped": s.dropped,
                    "fps": s.fps,
                    "faces": s.faces,
                    "latency_ms_p95": s.latency_ms_p95,
                    "state": s.state,
                }
                for s in streams
            ],
            "batcher": {"calls": 120, "faces": 300, "mean_batch": 2.5},
        }

    def close(self) -> None:
        self.closed = True
