"""File outputs of a stream: annotated video file, JSON lines, tracks CSV, and `RunOutputs`, the
sink that writes them together. Each is a context manager so that whatever was written is
finalized on normal end, on errors and on Ctrl-C."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Self, TypeVar

import av
import cv2
import numpy as np

from stream.config import OutputConfig
from stream.drain import BaseSink
from stream.outputs import OutputError, PartialFile
from stream.records import event_record, frame_record, moved_record, start_record
from stream.sources import SourceEvent
from stream.track_report import TrackLedger, TrackSummary
from stream.types import AnnotatedFrame, StreamStart

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
# Seconds between forcing the video to disk, so that power loss keeps all but the last few.
SYNC_EVERY_S = 2.0


class _FileSink:
    """What every file output shares: a PartialFile (None: writing to stdout) committed on a
    clean close, kept under its partial name when a write failed."""

    _file: PartialFile | None
    path: Path

    @property
    def finished(self) -> bool:
        return self._file is None or not self._file.broken

    @property
    def kept(self) -> Path:
        return self._file.path if self._file is not None else self.path

    def close(self) -> None:
        if self._file is None:
            return
        if self._file.broken:
            self._file.abandon()
        else:
            self._file.commit()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


FileSinkT = TypeVar("FileSinkT", bound=_FileSink)


class VideoFileSink(_FileSink):
    """Annotated frames as H.264 in fragmented MP4, at the source's size and frame rate.

    A fragment is closed at every keyframe (once a second), flushed, and synced to disk every
    few seconds, so the partial file stays playable up to the last second or two however
    the run ends (SIGKILL, power loss); browsers and phones play H.264.
    """

    _file: PartialFile  # never standard output

    def __init__(self, path: str | Path, width: int, height: int, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in VIDEO_SUFFIXES:
            raise OutputError(
                f"cannot write video {self.path}: agestream writes H.264 MP4; "
                f"use a file name ending in {' or '.join(VIDEO_SUFFIXES)}"
            )
        self._file = PartialFile(self.path, "video")
        # yuv420p needs even sides: an odd last row or column is left out.
        self._size = (width - width % 2, height - height % 2)
        self._keyframe_every = max(1, round(fps))
        self._container = av.open(
            self._file, mode="w", format="mp4",
            options={"movflags": "frag_keyframe+empty_moov+default_base_moof"},
        )  # fmt: skip
        self._stream = self._container.add_stream(
            "libx264", rate=Fraction(fps).limit_denominator(1001)
        )
        self._stream.width, self._stream.height = self._size
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.gop_size = self._keyframe_every
        # `agestream bench` compares the CPU per frame with OpenCV's MPEG-4 part 2 writer used
        # before: ultrafast at CRF 26 on one thread (the pipeline's stages use the other
        # cores) costs less, and looks better (PSNR 41.4 against 39.1 dB at 720p, 2/3 the size).
        self._stream.options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "26"}
        self._stream.codec_context.thread_count = 1
        self.frames_written = 0
        self._last_sync = time.monotonic()

    def write(self, image: np.ndarray) -> None:
        width, height = self._size
        # OpenCV's SIMD BGR to I420 (BT.601, limited range, as swscale's) costs a third of
        # the encoder's own bgr24 conversion.
        bgr = np.ascontiguousarray(image[:height, :width])
        planes = np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts = self.frames_written
        self._mux(self._stream.encode(frame))
        self.frames_written += 1

    def _mux(self, packets: list) -> None:
        for packet in packets:
            if packet.is_keyframe:
                # The fragment before this keyframe is complete on disk.
                self._file.mark()
                if time.monotonic() - self._last_sync >= SYNC_EVERY_S:
                    self._file.sync()
                    self._last_sync = time.monotonic()
            try:
                self._container.mux(packet)
            except av.error.FFmpegError as error:
                raise self._write_error(error) from None

    def _write_error(self, error: Exception) -> OutputError:
        if self._file.broken:  # the file's own write failed and said why
            return OutputError(self._file.failure or str(error))
        return OutputError(f"cannot write video {self.path}: {error}")

    def close(self) -> None:
        """Finish the file, or keep what was written in the partial file after a failure."""
        if self._file.broken:
            self._file.abandon()
            return
        try:
            self._mux(self._stream.encode())
            self._container.close()
        except (OutputError, av.error.FFmpegError) as error:
            self._file.abandon()
            raise OutputError(str(error)) from None
        self._file.commit()


class JsonLinesSink(_FileSink):
    """One JSON record per line, written whole or not at all, so that a run killed at any
    moment leaves only whole lines; "-" writes to standard output."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._to_stdout = str(path) == "-"
        self._file = None if self._to_stdout else PartialFile(self.path, "JSON lines file")
        self.lines_written = 0

    def write(self, record: dict) -> None:
        # allow_nan=False: a NaN that slipped through is a bug to hear of, not invalid JSON.
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        if self._file is None:
            sys.stdout.write(line)
            sys.stdout.flush()
        else:
            self._file.write(line.encode("utf-8"))
            self._file.mark()
        self.lines_written += 1


TRACK_CSV_COLUMNS = [f.name for f in dataclasses.fields(TrackSummary)]
TRACK_CSV_DIGITS = {
    "first_t_ms": 1, "last_t_ms": 1, "age": 2, "age_uncertainty": 2, "age_low": 1, "age_high": 1,
    "p_male": 4,
    "mean_quality": 4,
}  # fmt: skip


class TrackCsvSink(_FileSink):
    """One row per track, written when the track ends; each row whole, so a killed run keeps
    the rows of the tracks that had ended."""

    _file: PartialFile  # never standard output

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = PartialFile(self.path, "tracks CSV")
        self.rows_written = 0
        self._write_rows([dict(zip(TRACK_CSV_COLUMNS, TRACK_CSV_COLUMNS))])

    def _write_rows(self, rows: list[dict]) -> None:
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=TRACK_CSV_COLUMNS).writerows(rows)
        self._file.write(text.getvalue().encode("utf-8"))
        self._file.mark()

    def write_all(self, summaries: list[TrackSummary]) -> None:
        rows = []
        for summary in summaries:
            row = dataclasses.asdict(summary)
            for name, digits in TRACK_CSV_DIGITS.items():
                row[name] = "" if not math.isfinite(row[name]) else round(row[name], digits)
            rows.append(row)
        if rows:
            self._write_rows(rows)
            self.rows_written += len(rows)


class RunOutputs(BaseSink):
    """A stream's file outputs, opened together, each finalized on its own whatever happens to
    the others; `report` says which are whole ("wrote …") and which are not.

    Frames reach it in the order they were processed: the video and the JSON lines get
    every frame, the tracks CSV a row per track built from those same frames.
    """

    def __init__(
        self,
        output: OutputConfig,
        width: int,
        height: int,
        fps: float,
        stamp: dict | None = None,
    ) -> None:
        self.video = self.json = self.tracks = None
        # Keys put first into every JSON record (a served stream's {"stream": id}).
        self._stamp = dict(stamp or {})
        self._ledger = TrackLedger()
        self._opened: list = []
        try:
            if output.video:
                self.video = self._open(VideoFileSink(output.video, width, height, fps))
            if output.json:
                self.json = self._open(JsonLinesSink(output.json))
            if output.tracks:
                self.tracks = self._open(TrackCsvSink(output.tracks))
        except BaseException:
            self.close()
            raise

    def _open(self, sink: FileSinkT) -> FileSinkT:
        self._opened.append(sink)
        return sink

    def start(self, stream: StreamStart) -> None:
        self._write_record(start_record(stream))
        if stream.moved_from is not None:
            self._write_record(moved_record(stream))

    def frame(self, frame: AnnotatedFrame) -> None:
        """One processed frame to every output."""
        if self.video is not None:
            self.video.write(frame.image)
        self._write_record(frame_record(frame.result))
        self._ledger.add(frame.result)

    def source_event(self, event: SourceEvent, t_ms: float) -> None:
        self._write_record(event_record(event, t_ms))

    def people_left(self, people: tuple[int, ...], t_ms: float) -> None:
        summaries = self._ledger.end(list(people))
        if self.tracks is not None:
            self.tracks.write_all(summaries)

    def _write_record(self, record: dict) -> None:
        if self.json is not None:
            self.json.write({**self._stamp, **record})

    def close(self) -> None:
        """Finalize every output; the first failure is raised once all were tried."""
        failures: list[OutputError] = []
        if self.tracks is not None and self.tracks.finished:
            try:
                self.tracks.write_all(self._ledger.end_all())
            except OutputError as error:
                failures.append(error)
        for sink in self._opened:
            try:
                sink.close()
            except OutputError as error:
                failures.append(error)
        self._opened = []
        if failures:
            raise failures[0]

    def report(self) -> list[str]:
        """A line per output: "wrote PATH (N frames)", or where what was written is kept."""
        lines = []
        for sink, count, unit in (
            (self.video, self.video and self.video.frames_written, "frames"),
            (self.json, self.json and self.json.lines_written, "lines"),
            (self.tracks, self.tracks and self.tracks.rows_written, "tracks"),
        ):
            if sink is None or str(sink.path) == "-":
                continue
            if sink.finished:
                lines.append(f"wrote {sink.path} ({count} {unit})")
            else:
                lines.append(f"NOT written {sink.path}: {count} whole {unit} kept in {sink.kept}")
        return lines

    def __enter__(self) -> RunOutputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
