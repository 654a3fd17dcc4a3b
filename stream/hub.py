"""Many streams in one process, one batched estimator across them: `StreamHub`.

Each `ServedStream` is `run`'s stages on its own (stream.stages: capture thread, detection for
unpaced files, processing with its own detector, tracker, smoothing and identities) plus a
thread of its own that drains their results into its sinks (stream.drain): its files with
`store: video`, its `LiveView` (the latest result and annotated image for the web layer), the
visits store and the events out. Every stream's estimates go through the one
`EstimateBatcher` given to the hub, so the model runs batched across streams.

Files are played like cameras (paced at their own frame rate, the newest frame wins and
drops are counted) and repeat with `loop_files`; a camera that is down when it is added, or
goes away later, is retried for ever ("reconnecting"). Nothing here blocks on a stream: `add`
returns at once, a stream whose source fails for good is marked "failed", and every wait has a
timeout.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np

from estimators import Estimator
from estimators.base import first_line
from stream.config import Config, OutputConfig, StreamEntry, stream_config
from stream.drain import BaseSink, HookSink, Sink, close_sinks, delivered, drain, start_sinks
from stream.outputs import UTC_STAMP, OutputError, check_output_paths, partial_path
from stream.overlay import Drawing, font_scale
from stream.people_sinks import EventPublisher, EventsSink, VisitsSink
from stream.pipeline import output_paths
from stream.records import people_in_view
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
from stream.stages import (
    RunSummary,
    Stages,
    build_processor,
    build_stages,
    face_embedder,
    make_source,
    stop_stages,
    stream_start,
)
from stream.types import (
    AnnotatedFrame,
    CountRow,
    FrameResult,
    StreamIdInUse,
    StreamStart,
    StreamStatus,
    TrackStatus,
    Visit,
)
from stream.visits import VisitStore

log = logging.getLogger(__name__)

# remove() waits this long for a stream to stop and finalize its outputs.
STOP_TIMEOUT_S = 3.0
FPS_WINDOW_S = 2.0
LATENCY_FRAMES = 100
JPEG_QUALITY = 80
MAX_ID_CHARS = 64
_VALID_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")  # a URL's, as a source starts
MAX_WEBCAM_DIGITS = 3
# A stream's outputs, each written as NAME.partial.EXT until renamed to NAME.EXT.
OUTPUT_SUFFIXES = (".mp4", ".jsonl", ".csv")
# Source events a stream keeps for its sinks until they drain them (the newest win).
MAX_WAITING_EVENTS = 100
# While close() waits for streams still finalizing, it says which every this many seconds.
CLOSE_REPORT_S = 5.0

# Called on a stream's consumer thread with its id, each result and time.monotonic() when
# its annotated frame is ready (`agestream bench --streams` measures with it).
StreamResultHook = Callable[[str, FrameResult, float], None]


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
    scheme = SCHEME.match(text)
    if scheme and not text.lower().startswith((*URL_SCHEMES, "file://")):
        supported = ", ".join([*URL_SCHEMES, "file://"])
        raise ValueError(f"unsupported scheme {scheme[1][:20]!r}: use {supported}")
    if text.isdigit() and not (text.isascii() and len(text) <= MAX_WEBCAM_DIGITS):
        raise ValueError(f"webcam index {_shown(text, 20)} is out of range: 0 to 999")
    try:
        spec = parse_source(source)
    except (SourceError, OSError, ValueError):  # OSError: a name too long; ValueError: a NUL
        spec = None
    if spec is None or (spec.kind == "file" and not _decodes(str(spec.target))):
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


def new_stream_id(
    stream_id: str | None, file_path: Path | None, taken: Container[str], cameras: Iterator[int]
) -> str:
    """`stream_id` checked, or the next free default: the file's stem (then -2, -3, ...) or
    cam1, cam2, ... (numbers from `cameras`).

    Raises:
        ValueError: an empty, too long or malformed id; StreamIdInUse for one in `taken`.
    """
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
        if stream_id in taken:
            raise StreamIdInUse(f"stream id {stream_id!r} is already in use")
        return stream_id
    if file_path is not None:
        # Room for a "-n" suffix within MAX_ID_CHARS.
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", file_path.stem)[: MAX_ID_CHARS - 8]
        stem = stem.strip("_.-") or "file"
        candidates = (stem if n == 1 else f"{stem}-{n}" for n in range(1, 10**6))
        return next(c for c in candidates if c not in taken)
    return next(f"cam{n}" for n in cameras if f"cam{n}" not in taken)


class LiveView(BaseSink):
    """A served stream's latest result and annotated image, its rates and the people in view,
    for the page and the API; `summary` counts its frames. Safe from any thread."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        self._lock = threading.Lock()
        self._jpeg_lock = threading.Lock()
        self._latest: tuple[int, FrameResult, np.ndarray] | None = None
        self._jpeg: tuple[int, bytes] | None = None
        self._tracks: tuple[TrackStatus, ...] = ()
        self._since_ms: dict[int, float] = {}
        self._done_at: deque[float] = deque()  # when the frames of the last FPS_WINDOW_S were
        self._latencies: deque[float] = deque(maxlen=LATENCY_FRAMES)

    def frame(self, frame: AnnotatedFrame) -> None:
        now, result = time.monotonic(), frame.result
        tracks = people_in_view(frame, self._since_ms)
        with self._lock:
            self.summary.count(result)
            self._latest = (self.summary.frames, result, frame.image)
            self._tracks = tracks
            self._done_at.append(now)
            while now - self._done_at[0] > FPS_WINDOW_S:
                self._done_at.popleft()
            self._latencies.append((now - result.frame.timestamp) * 1000)

    def rates(self) -> tuple[float, float | None]:
        """FPS over the last FPS_WINDOW_S (0 once frames stop) and latency p95 in ms."""
        with self._lock:
            now = time.monotonic()
            recent = [t for t in self._done_at if now - t <= FPS_WINDOW_S]
            fps = (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9) if len(recent) > 1 else 0.0
            latencies = list(self._latencies)
        p95 = round(float(np.percentile(latencies, 95)), 1) if latencies else None
        return round(fps, 2), p95

    def now(self) -> tuple[int, int, int, tuple[TrackStatus, ...]]:
        """Frames and faces so far, faces in the latest frame, the people in view."""
        with self._lock:
            latest = self._latest
            faces_now = len(latest[1].faces) if latest is not None else 0
            return self.summary.frames, self.summary.faces, faces_now, self._tracks

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


class _StateOnFirstFrame(BaseSink):
    """Marks the stream running when its first frame is done."""

    def __init__(self, stream: ServedStream) -> None:
        self._stream = stream

    def frame(self, frame: AnnotatedFrame) -> None:
        if self._stream.state == "starting":
            self._stream.state = "running"


class ServedStream(threading.Thread):
    """One source of the hub: opens it, runs its stages and drains their results into its
    sinks on this thread; `status`, `latest_jpeg` and `metrics` are safe from any thread."""

    def __init__(
        self,
        hub: StreamHub,
        stream_id: str,
        source: VideoSource,
        outputs: OutputConfig | None,
        config: Config,
        region: tuple[float, float, float, float] | None,
        moved_from: str | None = None,
    ) -> None:
        super().__init__(name=f"stream:{stream_id}", daemon=True)
        self.hub, self.id, self.source, self.output = hub, stream_id, source, outputs
        self.moved_from = moved_from  # the cluster node it ran on before that node died
        # The hub's config with the stream's own settings; only faces centred in `region` count.
        self.config, self.region = config, region
        self.state = "starting"
        self.error: str | None = None
        self.summary = RunSummary(source_id=source.source_id)
        self.live = LiveView(self.summary)
        self.stages: Stages | None = None
        # Bounded: a camera down for a day before it first answers would pile up its attempts.
        self._events: deque[SourceEvent] = deque(maxlen=MAX_WAITING_EVENTS)
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

    def _sinks(self, stack: ExitStack, stream: StreamStart) -> list[Sink]:
        """This stream's sinks, closed with `stack`: its files (with `store: video`), the live
        view, the visits store, the events out and the hub's result hook."""
        info, hub = self.source.info, self.hub
        sinks: list[Sink] = []
        stack.callback(close_sinks, sinks, self.summary.outputs)
        if self.output is not None:
            stamp = {"stream": self.id}
            sinks.append(RunOutputs(self.output, info.width, info.height, info.fps, stamp))
        sinks += [self.live, _StateOnFirstFrame(self)]
        earlier: list[Visit] = []
        if hub.store is not None:
            earlier = self._end_earlier(hub.store, stream)
            sinks.append(VisitsSink(hub.store))
        if hub.publishers:
            announce = self.config.events.home_assistant
            sinks.append(EventsSink(hub.publishers, earlier, announce))
        if hub.on_result is not None:
            on_result = hub.on_result
            sinks.append(HookSink(lambda result, now: on_result(self.id, result, now)))
        return sinks

    def _end_earlier(self, store: VisitStore, stream: StreamStart) -> list[Visit]:
        """The visits an earlier incarnation of this camera left open, now ended."""
        try:
            return store.end_earlier(stream.camera, stream.run)
        except Exception as error:  # noqa: BLE001 - the counts do not depend on it
            log.warning("stream %s: cannot end earlier visits: %s", self.id, first_line(error))
            return []

    def _serve(self, stack: ExitStack) -> bool:
        """Open, build, run and drain; True when the source ended or the stream stopped."""
        source, config, hub = self.source, self.config, self.hub
        stack.enter_context(source.open())  # a camera that is down: until it answers, or a stop
        if source.stop_event.is_set():
            return True
        info = source.info
        processor = build_processor(config, info, hub.estimator, stack, hub.embedder, self.region)
        estimator = getattr(hub.estimator, "name", "")
        stream = stream_start(self.id, source, estimator, hub.node, self.moved_from)
        sinks = self._sinks(stack, stream)
        start_sinks(sinks, stream)
        drawing = Drawing(
            font_scale(info.width, info.height), config.output.hud, config.output.blur
        )
        stages = build_stages(
            processor, source, config.source.queue_size, source.stop_event, drawing
        )
        self.stages = stages
        stack.callback(stop_stages, stages, self.summary, source)
        gc.freeze()  # as in run: the models just loaded stay out of the collector's full passes
        for stage in stages.threads:
            stage.start()
        drain(delivered(stages, self._events), sinks, source.stop_event)
        stages.raise_error()
        return True

    @property
    def dropped(self) -> int:
        return self.stages.capture.drops if self.stages is not None else 0

    def status(self) -> StreamStatus:
        fps, p95 = self.live.rates()
        frames, _, faces_now, tracks = self.live.now()
        return StreamStatus(
            id=self.id,
            source=self.source.source_id,
            state=self.state,
            fps=fps,
            faces=faces_now,
            tracks=tracks,
            dropped=self.dropped,
            frames=frames,
            latency_ms_p95=p95,
            error=self.error,
            node=self.hub.node,
        )

    def metrics(self) -> dict:
        fps, p95 = self.live.rates()
        frames, faces, _, _ = self.live.now()
        return {
            "id": self.id, "frames": frames, "dropped": self.dropped, "fps": fps,
            "faces": faces, "latency_ms_p95": p95, "state": self.state,
        }  # fmt: skip

    def latest_jpeg(self, after: int = -1) -> tuple[int, bytes] | None:
        return self.live.latest_jpeg(after)


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


class StoreCounts:
    """A hub's counts from its visits store (StreamHub's and the cluster's ClusterHub's)."""

    store: VisitStore | None

    def served(self) -> set[str]:
        """The ids of the streams served now."""
        raise NotImplementedError

    def counts(
        self, start: float, end: float, camera: str | None = None, by: str = "hour"
    ) -> list[CountRow]:
        """People per camera, period, age group and gender from the visits store ([] without
        one); ValueError for a bad range or `by`."""
        if self.store is None:
            if by not in ("hour", "day") or not start < end:
                raise ValueError(f"by must be hour or day and from before to, got {by!r}")
            return []
        return self.store.counts(start, end, camera, by)

    def cameras(self) -> list[str]:
        """Every camera of the visits store and every stream now served, sorted."""
        stored = set(self.store.cameras()) if self.store is not None else set()
        return sorted(self.served() | stored)


class StreamHub(StoreCounts):
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
        store: the visits store every stream saves its people's visits into (the hub does
            not close it), or None.
        publishers: where every stream's person_entered / person_left events go.
        node: the cluster node this hub serves on (`serve --cluster`): each stream's
            outputs become segments in a folder of their own (see `_new_name`).
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
        store: VisitStore | None = None,
        publishers: Sequence[EventPublisher] = (),
        node: str | None = None,
    ) -> None:
        self.config = config
        self.node = node
        self.estimator = estimator
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.loop_files = loop_files
        self.pace_files = pace_files
        self.on_result = on_result
        self.store = store
        self.publishers = tuple(publishers)
        self._streams: dict[str, ServedStream] = {}
        self._stopping: list[ServedStream] = []  # removed, still finalizing their outputs
        self._names: set[Path] = set()  # output names given to streams (see _new_name)
        self._lock = threading.Lock()
        self._closed = False
        self._cameras = itertools.count(1)  # numbers of the default ids cam1, cam2, ...
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

    def _open_later(self, source: str, config: Config) -> VideoSource:
        """The stream's unopened source; ValueError for a clearly bad one (see `checked`)."""
        spec = checked(source)
        if spec.kind == "file" and self.pace_files:
            return SimulatedLiveSource(str(spec.target), loop=self.loop_files)
        # A camera that is down now is retried for ever ("reconnecting"), never failed.
        return make_source(config, source, wait_at_start=True)

    def _new_id(self, stream_id: str | None, source: VideoSource) -> str:
        return new_stream_id(stream_id, source.file_path, self._streams, self._cameras)

    def _new_name(self, stream_id: str) -> Path:
        """`DIR/ID-<UTC start>` (then -2, -3, ...), or on a cluster node the segment
        `DIR/ID/ID-<UTC start>-<node>`: a name no file (final or partial, of any
        output) and no stream of this hub has, so nothing earlier is ever replaced. A name
        ends in digits and a partial one in ".partial", so no id's partial file can be
        another id's final one."""
        assert self.output_dir is not None
        stamp = time.strftime(UTC_STAMP, time.gmtime())
        folder, node = self.output_dir, ""
        if self.node is not None:  # a segment: DIR/ID/ID-<UTC start>-<node>
            folder, node = self.output_dir / stream_id, f"-{self.node}"
            folder.mkdir(exist_ok=True)
        stem = f"{stream_id}-{stamp}{node}"
        names = (stem + (f"-{n}" if n > 1 else "") for n in itertools.count(1))
        for name in names:
            finals = [folder / (name + suffix) for suffix in OUTPUT_SUFFIXES]
            taken = any(os.path.lexists(p) for f in finals for p in (f, partial_path(f)))
            if folder / name not in self._names and not taken:
                break
        self._names.add(folder / name)
        return folder / name

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

    def add(
        self,
        source: str | VideoSource,
        stream_id: str | None = None,
        entry: StreamEntry | None = None,
        moved_from: str | None = None,
    ) -> StreamStatus:
        """Start serving `source` (a source argument, or an unopened `VideoSource`) with the
        region and settings of `entry` (a config's stream entry); returns at once in state
        "starting". `moved_from`: the cluster node it ran on until that node died.

        Raises:
            ValueError: one line: empty, malformed or duplicate id, missing file, closed hub,
                bad settings.
        """
        entry = entry or StreamEntry(source=str(source))
        config = stream_config(self.config, entry)
        video = source if isinstance(source, VideoSource) else self._open_later(str(source), config)
        with self._lock:
            if self._closed:
                raise ValueError("the stream hub is closed")
            stream_id = self._new_id(stream_id, video)
            output = self._output_config(stream_id, video)
            stream = ServedStream(self, stream_id, video, output, config, entry.roi, moved_from)
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

    def served(self) -> set[str]:
        with self._lock:
            return set(self._streams)

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
