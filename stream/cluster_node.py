"""One worker node's share of `serve --cluster`: `NodeAgent`, the Ray actor (made with
`ray.remote` by stream.cluster) that owns the StreamHub serving the cameras placed on its node.

Everything of a camera stays on its node: capture, detection, tracking, smoothing, overlay,
the estimator (or the estimator service's client) and the writers of its segments. What
leaves the node is small: statuses, metrics and, when the page asks, a JPEG.
"""

from __future__ import annotations

from contextlib import ExitStack

from estimators import Estimator, create_estimator
from stream.batcher import EstimateBatcher
from stream.config import Config, StreamEntry
from stream.hub import StreamHub
from stream.site_outputs import open_publishers, store_target, video_dir
from stream.types import StreamStatus
from stream.visits import open_store

# A status and metrics snapshot of every stream of a node, as the head polls it.
Snapshot = tuple[list[StreamStatus], dict]


class NodeAgent:
    """The cameras of one node: a StreamHub with its own estimator, batcher, visits store
    connection and events out, its outputs written as segments named after `node`.

    Args:
        config: the head's config (every stream's settings come with its entry).
        node: the node's name in statuses, metrics and segment names.
        estimator_service: batches go to the Ray Serve estimator deployment, this node's
            own model standing in when it does not answer in time.
    """

    def __init__(self, config: Config, node: str, estimator_service: bool = False) -> None:
        self._resources = ExitStack()
        settings = config.serve
        try:
            store = self._resources.enter_context(open_store(store_target(settings)))
            publishers = open_publishers(config.events, self._resources)
            estimator: Estimator = create_estimator(config.estimator, config.models_dir)
            if estimator_service:
                from stream.estimator_service import ServiceEstimator

                estimator = ServiceEstimator(estimator)
            self._estimator = estimator
            batcher = self._resources.enter_context(
                EstimateBatcher(estimator, settings.max_batch, settings.max_wait_ms)
            )
            self.hub = StreamHub(
                config, batcher, video_dir(settings), settings.loop,
                store=store, publishers=publishers, node=node,
            )  # fmt: skip
        except BaseException:
            self._resources.close()
            raise

    def ready(self) -> bool:
        """Answers once the models are loaded (the head waits for it before placing)."""
        return True

    def add(
        self, source: str, stream_id: str, entry: StreamEntry, moved_from: str | None
    ) -> StreamStatus:
        """See StreamHub.add; ValueError (one line) for a source this node cannot open."""
        return self.hub.add(source, stream_id, entry, moved_from)

    def remove(self, stream_id: str) -> None:
        """Stop a stream and finalize its segment; KeyError for an unknown id."""
        self.hub.remove(stream_id)

    def snapshot(self) -> Snapshot:
        """Every stream's status and the hub's metrics, with the estimator service's figures."""
        metrics = self.hub.metrics()
        stats = getattr(self._estimator, "stats", None)
        if stats is not None:
            metrics["service"] = stats()
        return self.hub.streams(), metrics

    def latest_jpeg(self, stream_id: str, after: int = -1) -> tuple[int, bytes] | None:
        try:
            return self.hub.latest_jpeg(stream_id, after)
        except KeyError:  # removed, or moved here a moment ago
            return None

    def close(self) -> list[str]:
        """Stop every stream, finalize every segment and release the models; the summaries."""
        try:
            return self.hub.close()
        finally:
            self._resources.close()
