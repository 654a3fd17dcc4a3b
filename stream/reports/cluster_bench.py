"""`agestream bench VIDEO --streams N --live-fps F --cluster HOST:PORT|local`: N live cameras
served by one process and spread over a Ray cluster, measured the same way in one run.

Each camera is the clip played at F FPS (a copy of the clip resampled to F FPS, looping, the
newest frame wins), as `serve` plays files; the single-process hub runs first, then the
cluster (`ClusterHub`: the streams on the worker nodes), then, with `--estimator-service`,
the cluster again with every batch estimated by the Ray Serve deployment. After a warm-up,
each second's statuses give the aggregate FPS (frames processed over the window), the drops,
and each stream's capture-to-annotated p95 (over its last 100 frames): the figure is the
median over the samples and streams. `local` starts a cluster of a head and two worker nodes
of one CPU each on this machine for the run.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2

from stream.config import Config
from stream.reports.bench import LIVE_WARM_UP_S
from stream.types import StreamStatus

log = logging.getLogger(__name__)

START_LIMIT_S = 240.0  # the nodes load their models before the first frame
SAMPLE_EVERY_S = 1.0
COPY_SECONDS = 20.0  # of the clip, resampled: the cameras loop over it


def resampled_copy(source: str, fps: float, folder: Path) -> Path:
    """The first COPY_SECONDS of `source` at `fps` (frames picked on the new clock), as an
    MP4 in `folder`: both modes play it at its own rate."""
    capture = cv2.VideoCapture(source)
    own_fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    target = folder / f"{Path(source).stem}-{fps:g}fps.mp4"
    writer: cv2.VideoWriter | None = None
    taken, index = 0, 0
    try:
        while taken < COPY_SECONDS * fps:
            ok, image = capture.read()
            if not ok:
                break
            if index * fps / own_fps >= taken:  # the next frame of the new clock
                if writer is None:
                    size = (image.shape[1], image.shape[0])
                    writer = cv2.VideoWriter(
                        str(target), cv2.VideoWriter.fourcc(*"mp4v"), fps, size
                    )
                writer.write(image)
                taken += 1
            index += 1
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if taken == 0:
        raise ValueError(f"bench: no frame decoded from {source}")
    return target


def measure(streams: Callable[[], list[StreamStatus]], seconds: float) -> dict:
    """Aggregate FPS, drops and the median p95 of `streams` over `seconds`, after every
    stream has run LIVE_WARM_UP_S."""
    deadline = time.monotonic() + START_LIMIT_S
    while True:
        now = streams()
        if now and all(s.state == "running" and s.frames > 0 for s in now):
            break
        failed = [s for s in now if s.state == "failed"]
        if failed:
            raise RuntimeError(f"bench: stream {failed[0].id} failed: {failed[0].error}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: the streams did not all run within {START_LIMIT_S:.0f} s")
        time.sleep(0.1)
    time.sleep(LIVE_WARM_UP_S)
    first, started = {s.id: s for s in streams()}, time.monotonic()
    p95s: list[float] = []
    while time.monotonic() - started < seconds:
        time.sleep(SAMPLE_EVERY_S)
        p95s += [s.latency_ms_p95 for s in streams() if s.latency_ms_p95 is not None]
    last, took = {s.id: s for s in streams()}, time.monotonic() - started
    frames = sum(last[i].frames - first[i].frames for i in first)
    dropped = sum(last[i].dropped - first[i].dropped for i in first)
    return {
        "streams": len(first),
        "aggregate_fps": round(frames / took, 2),
        "dropped_pct": round(100 * dropped / max(frames + dropped, 1), 2),
        "p95_ms": round(statistics.median(p95s), 1) if p95s else None,
        "nodes": sorted({s.node for s in last.values() if s.node is not None}),
    }


def single_process(config: Config, clip: Path, streams: int, seconds: float) -> dict:
    from estimators import create_estimator
    from stream.batcher import EstimateBatcher
    from stream.hub import StreamHub

    serve = config.serve
    estimator = create_estimator(config.estimator, config.models_dir)
    with EstimateBatcher(estimator, serve.max_batch, serve.max_wait_ms) as batcher:
        with StreamHub(config, batcher, loop_files=True) as hub:
            for number in range(1, streams + 1):
                hub.add(str(clip), f"live{number}")
            return measure(hub.streams, seconds)


def on_cluster(config: Config, address: str, clip: Path, streams: int, seconds: float) -> dict:
    from stream.cluster import ClusterHub

    with ClusterHub(config, address) as hub:
        for number in range(1, streams + 1):
            hub.add(str(clip), f"live{number}")
        result = measure(hub.streams, seconds)
        service = hub.metrics()["cluster"]["service"]
    if service:
        result["service_p95_ms"] = [round(s["latency_p95_ms"] or 0.0, 1) for s in service]
        result["service_fallbacks"] = sum(s["fallbacks"] for s in service)
    return result


@contextmanager
def local_cluster() -> Iterator[str]:
    """A head and two worker nodes of one CPU each on this machine, the head as `agestream
    cluster head` runs it; its address, and the cluster stopped afterwards."""
    from ray.cluster_utils import Cluster

    from stream.cluster_command import HEAD_NODE_ARGS

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, **HEAD_NODE_ARGS},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()


def cluster_bench(
    config: Config, source: str, streams: int, fps: float, seconds: float, address: str,
    service: bool, folder: Path,
) -> dict:  # fmt: skip
    """The single process, the cluster and (with `service`) the cluster with the estimator
    service, one after the other on the same cameras."""
    from stream.cluster import import_ray

    import_ray()
    clip = resampled_copy(source, fps, folder)
    config = dataclasses.replace(config, serve=dataclasses.replace(config.serve, loop=True))
    results: dict = {"streams": streams, "input_fps": fps, "seconds": seconds}
    results["single"] = single_process(config, clip, streams, seconds)
    with local_cluster() if address == "local" else _given(address) as target:
        results["cluster"] = on_cluster(config, target, clip, streams, seconds)
        if service:
            serve = dataclasses.replace(config.serve, estimator_service=True)
            with_service = dataclasses.replace(config, serve=serve)
            results["service"] = on_cluster(with_service, target, clip, streams, seconds)
    return results


@contextmanager
def _given(address: str) -> Iterator[str]:
    yield address


def format_cluster_results(results: dict) -> str:
    single = results["single"]
    lines = [
        f"bench --cluster: {results['streams']} cameras at {results['input_fps']:g} FPS for "
        f"{results['seconds']:g} s (noisy on a busy machine: compare ratios)",
        f"  single process   {single['aggregate_fps']:7.1f} FPS aggregate, p95 "
        f"{single['p95_ms']} ms, {single['dropped_pct']:.1f} % dropped",
    ]
    for key, title in (("cluster", "cluster"), ("service", "cluster+service")):
        if key not in results:
            continue
        part = results[key]
        ratio = part["aggregate_fps"] / max(single["aggregate_fps"], 1e-9)
        extra = ""
        if "service_p95_ms" in part:
            extra = f"; service call p95 {part['service_p95_ms']} ms, "
            extra += f"{part['service_fallbacks']} batches estimated locally"
        lines.append(
            f"  {title:<16} {part['aggregate_fps']:7.1f} FPS aggregate ({ratio:.2f}x), p95 "
            f"{part['p95_ms']} ms, {part['dropped_pct']:.1f} % dropped, on "
            f"{len(part['nodes'])} nodes{extra}"
        )
    return "\n".join(lines)
