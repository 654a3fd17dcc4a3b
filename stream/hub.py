"""Many streams in one process, one batched estimator across them: `StreamHub`.

Each `ServedStream` is `run`'s pipeline on its own (pipeline.build_stages: capture thread,
detection for unpaced files, processing with its own detector, tracker, smoothing and
identities) plus a consumer thread of its own that writes its outputs and keeps the latest
result and annotated image for the web layer. Every stream's estimates go through the one
`EstimateBatcher` given to the hub, so the model runs batched across streams.

Files are played like cameras (paced at their own frame rate, the newest frame wins and
drops are counted) and repeat with `loop_files`; live sources reconnect as in `run`.
Nothing here blocks on a stream: `add` returns at once, a source that fails to open marks
its stream "failed", and every wait has a timeout.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np

from estimators import Estimator
from estimators.base import first_line
from stream.buffers import END_OF_STREAM, Empty
from stream.config import Config, OutputConfig
from stream.outputs import OutputError, check_output_paths, partial_path
from stream.overlay import face_label_state, font_scale, gender_confidence, shown_age_range
from stream.pipeline import (
    POLL_S,
    RunSummary,
    Stages,
    build_processor,
    build_stages,
    face_embedder,
    make_source,
    output_paths,
    start_record,
    stop_stages,
    write_events,
)
from stream.sinks import RunOutputs
from stream.sources import (
    URL_SCHEMES,
    SimulatedLiveSource,
    SourceError,
    SourceEvent,
    SourceSpec,
    VideoSource,
    parse_source,
)
from stream.types import (
    PERSON_AGE_GROUPS,
    SHOWN_GENDERS,
    FrameResult,
    StreamIdInUse,
    StreamStatus,
    TrackStatus,
    person_age_group,
)

log = logging.getLogger(__name__)

# remove() waits this long for a stream to stop and finalize its outputs.
STOP_TIMEOUT_S = 3.0
FPS_WINDOW_S = 2.0
LATENCY_FRAMES = 100
JPEG_QUALITY = 80
HISTORY_BIN_S = 10
HISTORY_KEEP_S = 6 * 3600
MAX_ID_CHARS = 64
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
MAX_WEBCAM_DIGITS = 3
# A stream's outputs, each written as NAME.partial.EXT until renamed to NAME.EXT.
OUTPUT_SUFFIXES = (".mp4", ".jsonl", ".csv")
# While close() waits for streams still finalizing, it says which every this many seconds.
CLOSE_REPORT_S = 5.0

# Called on a stream's consumer thread with its id, each result and time.monotonic() when
# its annotated frame is ready (`agestream bench --streams` measures with it).
StreamResultHook = Callable[[str, FrameResult, float], None]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def track_statuses(result: FrameResult, since_ms: dict[int, float]) -> tuple[TrackStatus, ...]:
    """The confirmed people of `result`; `since_ms` maps a person to when it was confirmed."""
    if result.track_ids is None:
        return ()
    tracks = []
    for i, person in enumerate(result.track_ids):
        if result.confirmed is not None and not result.confirmed[i]:
            continue
        age, p_male, gender = face_label_state(result, i)
        uncertainty = math.inf if result.smoothed is None else result.smoothed.age_uncertainty[i]
        confidence = gender_confidence(gender, p_male)
        low, high = shown_age_range(result, i)
        tracks.append(
            TrackStatus(
                track=int(person),
                age=_finite(age),
                age_uncertainty=_finite(float(uncertainty)),
                age_low=_finite(low),
                age_high=_finite(high),
                gender=gender,
                confidence=None if confidence is None else _finite(confidence),
                seconds_in_view=round(
                    (result.t_ms - since_ms.get(int(person), result.t_ms)) / 1000, 2
                ),
            )
        )
    return tuple(tracks)


def _shown(text: str, limit: int = 200) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def checked(source: str) -> SourceSpec:
    """The parsed source, once it is known to be a supported URL, a webcam index or a video
    file that decodes.

    A file that is missing, unreadable, a folder or no video gets the same message, so that
    a client of the API learns nothing about which paths exist on the server.

    Raises:
        ValueError: one line: an unsupported URL scheme, a webcam index out of range, no
            video file.
    """
    text = source.strip()
    scheme = _SCHEME.match(text)
    if scheme and not text.lower().startswith((*URL_SCHEMES, "file://")):
        supported = ", ".join([*URL_SCHEMES, "file://"])
        raise ValueError(f"unsupported scheme {scheme[1][:20]!r}: use {supported}")
    if text.isdigit() and not (text.isascii() and len(text) <= MAX_WEBCAM_DIGITS):
        raise ValueError(f"webcam index {_shown(text, 20)} is out of range: 0 to 999")
    try:
        spec = parse_source(source)
    except (SourceError, OSError, ValueError):  # OSError: a name too long; ValueError: a NUL
        spec = None
    if spec is None or (spec.kind == "file" and not _decodes(spec.target)):
        raise ValueError(
            f"cannot open {_shown(text)}: no such video file, or not one this server can decode"
        )
    return spec


def _decodes(path: str) -> bool:
    """Whether OpenCV opens `path` and decodes its first frame."""
    capture = cv2.VideoCapture(path)
    try:
        return bool(capture.isOpened() and capture.read()[0])
    finally:
        capture.release()


class History:
    """People in view per HISTORY_BIN_S bin over all streams: each (stream, person) counts
    once per bin, with the age group and gender it last showed in it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bins: dict[int, dict[tuple[str, int], tuple[str | None, str | None]]] = {}

    def add(self, stream_id: str, tracks: tuple[TrackStatus, ...], now: float) -> None:
        start = int(now // HISTORY_BIN_S) * HISTORY_BIN_S
        with self._lock:
            if start not in self._bins:
                for old in [t for t in self._bins if t < now - HISTORY_KEEP_S]:
                    del self._bins[old]
            people = self._bins.setdefault(start, {})
            for track in tracks:
                group = None if track.age is None else person_age_group(track.age)
                people[(stream_id, track.track)] = (group, track.gender)

    def bins(self, minutes: float, now: float) -> list[dict]:
        last = int(now // HISTORY_BIN_S) * HISTORY_BIN_S
        first = int((now - minutes * 60) // HISTORY_BIN_S + 1) * HISTORY_BIN_S
        rows = []
        with self._lock:
            for start in range(min(first, last), last + 1, HISTORY_BIN_S):
                people = list(self._bins.get(start, {}).values())
                groups = {name: 0 for name in PERSON_AGE_GROUPS}
                genders = {name: 0 for name in SHOWN_GENDERS}
                for group, gender in people:
                    if group is not None:
                        groups[group] += 1
                    if gender in genders:
                        genders[gender] += 1
                rows.append(
                    {"t": start, "people": len(people), "age_groups": groups, "genders": genders}
                )
        return rows


class ServedStream(threading.Thread):
    """One source of the hub: opens it, runs its stages and consumes their results on this
    thread; `status`, `latest_jpeg` and `metrics` are safe from any thread."""

    def __init__(
        self, hub: StreamHub, stream_id: str, source: VideoSource, outputs: OutputConfig | None
    ) -> None:
        super().__init__(name=f"stream:{stream_id}", daemon=True)
        self.hub, self.id, self.source, self.output = hub, stream_id, source, outputs
        self.state, self.error = "starting", None
        self.summary = RunSummary(source_id=source.source_id)
        self.stages: Stages | None = None
        self._events: deque[SourceEvent] = deque()
        self._lock = threading.Lock()
        self._jpeg_lock = threading.Lock()
        self._latest: tuple[int, FrameResult, np.ndarray] | None = None
        self._jpeg: tuple[int, bytes] | None = None
        self._tracks: tuple[TrackStatus, ...] = ()
        self._since_ms: dict[int, float] = {}
        self._done_at: deque[float] = deque()  # when the frames of the last FPS_WINDOW_S were
        self._latencies: deque[float] = deque(maxlen=LATENCY_FRAMES)
        source.on_event = self._on_event

    def stop(self) -> None:
        self.source.stop_event.set()

    def _on_event(self, event: SourceEvent) -> None:
        self._events.append(event)
        if self.state not in ("ended", "failed"):
            self.state = "running" if event.kind == "reconnected" else "reconnecting"

    def run(self) -> None:
        try:
            with ExitStack() as stack:
                ended = self._serve(stack)
            if self.state not in ("failed",):
                self.state = "ended" if ended else self.state
        except Exception as error:  # the stream fails, the hub and the other streams go on
            log.warning("stream %s failed: %s", self.id, first_line(error))
            self.state, self.error = "failed", first_line(error)

    def _serve(self, stack: ExitStack) -> bool:
        """Open, build, run and consume; True when the source ended or the stream stopped."""
        source, config = self.source, self.hub.config
        info = stack.enter_context(source.open()).info
        if source.stop_event.is_set():
            return True
        processor = build_processor(config, info, self.hub.estimator, stack, self.hub.embedder)
        outputs = None
        if self.output is not None:
            outputs = RunOutputs(
                self.output, info.width, info.height, info.fps, {"stream": self.id}
            )
            estimator_name = getattr(self.hub.estimator, "name", "")
            outputs.write_event(start_record(info, source.file_path, estimator_name))
            stack.callback(lambda: self.summary.outputs.extend(outputs.report()))
            stack.enter_context(outputs)
        scale = font_scale(info.width, info.height)
        stages = build_stages(processor, source, config.source.queue_size, source.stop_event, scale)
        self.stages = stages
        stack.callback(stop_stages, stages, self.summary, source)
        gc.freeze()  # as in run: the models just loaded stay out of the collector's full passes
        for stage in stages.threads:
            stage.start()
        self._consume(stages, outputs)
        for stage in reversed(stages.threads):
            if stage.error is not None:
                raise stage.error
        return True

    def _consume(self, stages: Stages, outputs: RunOutputs | None) -> None:
        while True:
            try:
                item = stages.results.get(timeout=POLL_S)
            except Empty:
                self._write_events(outputs, stages)
                continue
            self._write_events(outputs, stages)
            if item is END_OF_STREAM:
                return
            annotated_at = time.monotonic()
            result, image, ended = item
            if outputs is not None:
                outputs.tracks_ended(ended)
                outputs.write(result, image)
            self._keep(result, image, ended, annotated_at)

    def _write_events(self, outputs: RunOutputs | None, stages: Stages) -> None:
        if outputs is not None:
            write_events(self._events, outputs, stages.processing.first_timestamp)
        else:
            self._events.clear()

    def _keep(self, result: FrameResult, image: np.ndarray, ended: list[int], now: float) -> None:
        """The latest result and image, the rates, the people in view and since when."""
        for person in ended:
            self._since_ms.pop(person, None)
        if result.track_ids is not None:
            for i, person in enumerate(result.track_ids):
                if result.confirmed is None or result.confirmed[i]:
                    self._since_ms.setdefault(int(person), result.t_ms)
        tracks = track_statuses(result, self._since_ms)
        with self._lock:
            self.summary.count(result)
            self._latest = (self.summary.frames, result, image)
            self._tracks = tracks
            self._done_at.append(now)
            while now - self._done_at[0] > FPS_WINDOW_S:
                self._done_at.popleft()
            self._latencies.append((now - result.frame.timestamp) * 1000)
        if self.state == "starting":
            self.state = "running"
        self.hub.people.add(self.id, tracks, time.time())
        if self.hub.on_result is not None:
            self.hub.on_result(self.id, result, now)

    @property
    def dropped(self) -> int:
        return self.stages.capture.drops if self.stages is not None else 0

    def _rates(self) -> tuple[float, float | None]:
        """FPS over the last FPS_WINDOW_S (0 once frames stop) and latency p95 in ms."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._done_at if now - t <= FPS_WINDOW_S]
            fps = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9) if len(recent) > 1 else 0.0
            latencies = list(self._latencies)
        p95 = round(float(np.percentile(latencies, 95)), 1) if latencies else None
        return round(fps, 2), p95

    def status(self) -> StreamStatus:
        fps, p95 = self._rates()
        with self._lock:
            latest, tracks, frames = self._latest, self._tracks, self.summary.frames
        return StreamStatus(
            id=self.id,
            source=self.source.source_id,
            state=self.state,
            fps=fps,
            faces=len(latest[1].faces) if latest is not None else 0,
            tracks=tracks,
            dropped=self.dropped,
            frames=frames,
            latency_ms_p95=p95,
            error=self.error,
        )

    def metrics(self) -> dict:
        fps, p95 = self._rates()
        with self._lock:
            frames, faces = self.summary.frames, self.summary.faces
        return {
            "id": self.id, "frames": frames, "dropped": self.dropped, "fps": fps,
            "faces": faces, "latency_ms_p95": p95, "state": self.state,
        }  # fmt: skip

    def latest_jpeg(self, after: int = -1) -> tuple[int, bytes] | None:
        """The newest annotated frame as JPEG, encoded once per frame and only when asked."""
        with self._lock:
            latest = self._latest
        if latest is None or latest[0] <= after:
            return None
        with self._jpeg_lock:
            if self._jpeg is None or self._jpeg[0] < latest[0]:
                ok, data = cv2.imencode(".jpg", latest[2], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                if not ok:
                    return None
                self._jpeg = (latest[0], data.tobytes())
            return self._jpeg


def _join_all(streams: list[ServedStream]) -> None:
    """Wait for every stream to end. Each one does: every wait of its stages has a timeout
    and END_OF_STREAM always reaches its consumer. Says which are still finishing every
    CLOSE_REPORT_S."""
    pending = streams
    while pending:
        deadline = time.monotonic() + CLOSE_REPORT_S
        for stream in pending:
            stream.join(max(0.0, deadline - time.monotonic()))
        pending = [stream for stream in pending if stream.is_alive()]
        if pending:
            shown = ", ".join(stream.id for stream in pending[:5])
            more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
            log.info("waiting for streams to stop: %s%s", shown, more)


class StreamHub:
    """Runs many streams in one process, all estimating through `estimator` (an
    `EstimateBatcher` shared by them; the hub does not close it).

    Args:
        config: detector, tracking and source settings for every stream.
        estimator: the shared (batched) estimator.
        output_dir: where each stream writes `<id>-<UTC start>.mp4`, `.jsonl` and `.csv`
            (JSON records carry `"stream": id`), never over an existing file; None writes
            nothing.
        loop_files: files start over at their end instead of ending.
        pace_files: play files at their own frame rate like cameras (newest frame wins);
            False reads them losslessly as fast as they are processed (`bench --streams`).
        on_result: called with each stream's results (see `StreamResultHook`).
    """

    def __init__(
        self,
        config: Config,
        estimator: Estimator,
        output_dir: str | Path | None = None,
        loop_files: bool = False,
        *,
        pace_files: bool = True,
        on_result: StreamResultHook | None = None,
    ) -> None:
        self.config = config
        self.estimator = estimator
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.loop_files = loop_files
        self.pace_files = pace_files
        self.on_result = on_result
        self.people = History()  # for history()
        self._streams: dict[str, ServedStream] = {}
        self._stopping: list[ServedStream] = []  # removed, still finalizing their outputs
        self._names: set[Path] = set()  # output names given to streams (see _new_name)
        self._lock = threading.Lock()
        self._closed = False
        self._cameras = 0
        # One face identity model for every stream: a session runs calls from many threads.
        self._models = ExitStack()
        self.embedder = face_embedder(config, self._models)
        # The streams' stages are the parallelism: OpenCV's own pool would oversubscribe.
        self._cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)

    def _stream(self, stream_id: str) -> ServedStream:
        with self._lock:
            if stream_id not in self._streams:
                raise KeyError(stream_id)
            return self._streams[stream_id]

    def streams(self) -> list[StreamStatus]:
        with self._lock:
            streams = list(self._streams.values())
        return [stream.status() for stream in streams]

    def status(self, stream_id: str) -> StreamStatus:
        return self._stream(stream_id).status()

    def _open_later(self, source: str) -> VideoSource:
        """The stream's unopened source; ValueError for a clearly bad one (see `checked`)."""
        spec = checked(source)
        if spec.kind == "file" and self.pace_files:
            return SimulatedLiveSource(spec.target, loop=self.loop_files)
        return make_source(self.config, source)

    def _new_id(self, stream_id: str | None, source: VideoSource) -> str:
        """`stream_id` checked, or the next free default (file stem, or cam1, cam2, ...)."""
        if stream_id is not None:
            stream_id = stream_id.strip()
            if not stream_id:
                raise ValueError("stream id must not be empty")
            if len(stream_id) > MAX_ID_CHARS:
                raise ValueError(
                    f"stream id is {len(stream_id)} characters long; at most {MAX_ID_CHARS}"
                )
            if not _VALID_ID.fullmatch(stream_id):
                raise ValueError(
                    f"stream id {stream_id!r} must be letters, digits, '_', '.' or '-' "
                    "(it names the stream's output files)"
                )
            if stream_id in self._streams:
                raise StreamIdInUse(f"stream id {stream_id!r} is already in use")
            return stream_id
        if source.file_path is not None:
            # Room for a "-n" suffix within MAX_ID_CHARS.
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.file_path.stem)[: MAX_ID_CHARS - 8]
            stem = stem.strip("_.-") or "file"
            candidates = (stem if n == 1 else f"{stem}-{n}" for n in range(1, 10**6))
            return next(c for c in candidates if c not in self._streams)
        while True:
            self._cameras += 1
            if f"cam{self._cameras}" not in self._streams:
                return f"cam{self._cameras}"

    def _new_name(self, stream_id: str) -> Path:
        """`DIR/ID-<UTC start>` (then -2, -3, ...): a name no file (final or partial, of any
        output) and no stream of this hub has, so nothing earlier is ever replaced. A name
        ends in digits and a partial one in ".partial", so no id's partial file can be
        another id's final one."""
        assert self.output_dir is not None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        names = (f"{stream_id}-{stamp}" + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
        for name in names:
            finals = [self.output_dir / (name + suffix) for suffix in OUTPUT_SUFFIXES]
            taken = any(os.path.lexists(p) for f in finals for p in (f, partial_path(f)))
            if self.output_dir / name not in self._names and not taken:
                break
        self._names.add(self.output_dir / name)
        return self.output_dir / name

    def _output_config(self, stream_id: str, source: VideoSource) -> OutputConfig | None:
        if self.output_dir is None:
            return None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        base = self._new_name(stream_id)
        output = OutputConfig(
            window=False,
            video=f"{base}.mp4",
            json=f"{base}.jsonl",
            tracks=f"{base}.csv",
        )
        try:
            check_output_paths(output_paths(output), source.file_path)
        except OutputError as error:
            raise ValueError(str(error)) from None
        return output

    def add(self, source: str | VideoSource, stream_id: str | None = None) -> StreamStatus:
        """Start serving `source` (a source argument, or an unopened `VideoSource`); returns at
        once in state "starting".

        Raises:
            ValueError: one line: empty, malformed or duplicate id, missing file, closed hub.
        """
        video = source if isinstance(source, VideoSource) else self._open_later(str(source))
        with self._lock:
            if self._closed:
                raise ValueError("the stream hub is closed")
            stream_id = self._new_id(stream_id, video)
            output = self._output_config(stream_id, video)
            stream = ServedStream(self, stream_id, video, output)
            self._streams[stream_id] = stream
            # Started under the lock: a remove() racing this add finds a thread it can join.
            stream.start()
        log.info("stream %s: %s", stream_id, video.source_id)
        return stream.status()

    def remove(self, stream_id: str) -> None:
        """Stop `stream_id` and finalize its outputs (waits up to STOP_TIMEOUT_S)."""
        with self._lock:
            if stream_id not in self._streams:
                raise KeyError(stream_id)
            stream = self._streams.pop(stream_id)
        stream.stop()
        stream.join(STOP_TIMEOUT_S)
        if stream.is_alive():
            # Finishing in the background; `close` waits for it, so its outputs are whole.
            log.warning("stream %s: still stopping after %.0f s", stream_id, STOP_TIMEOUT_S)
            with self._lock:
                self._stopping.append(stream)

    def latest_jpeg(self, stream_id: str, after: int = -1) -> tuple[int, bytes] | None:
        return self._stream(stream_id).latest_jpeg(after)

    def history(self, minutes: float = 10.0) -> list[dict]:
        """People in view per 10-s bin over all streams, the last `minutes`, oldest first:
        `{"t": bin start (unix s), "people": n, "age_groups": {...}, "genders": {...}}`."""
        return self.people.bins(minutes, time.time())

    def metrics(self) -> dict:
        with self._lock:
            streams = list(self._streams.values())
        batcher = self.estimator  # an estimator that is not a batcher counts nothing: zeros
        return {
            "streams": [stream.metrics() for stream in streams],
            "batcher": {
                "calls": getattr(batcher, "calls", 0),
                "faces": getattr(batcher, "faces", 0),
                "mean_batch": round(getattr(batcher, "mean_batch", 0.0), 2),
            },
        }

    def close(self) -> list[str]:
        """Stop every stream and finalize every output (the streams stop together, and each is
        waited for, however long its outputs take); each stream's summary, with the outputs
        it wrote."""
        with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
            streams, self._stopping = streams + self._stopping, []
        for stream in streams:
            stream.stop()
        _join_all(streams)
        # Only now: a model closed under a stream still using it would crash the process.
        self._models.close()
        cv2.setNumThreads(self._cv2_threads)
        return [stream.summary.format() for stream in streams]

    def __enter__(self) -> StreamHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
