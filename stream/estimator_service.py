"""The estimator as a Ray Serve deployment for a cluster's GPU pool, and the node-side
`ServiceEstimator` that sends each batch there and falls back to its own model.

`deploy_estimator_service` (on the head, after `ray.init(address=...)`) runs one application,
`APP_NAME`, without any HTTP proxy: its replicas build the estimator from a picklable factory
and merge the requests of many nodes with `@serve.batch` into ONE model call of at most
`max_batch` faces, each caller getting its own rows back in order. `ServiceEstimator` is an
`Estimator`, so a node's `EstimateBatcher` wraps it unchanged; a call the service does not
answer within `timeout_s`, or answers with an error, is cancelled and estimated locally. Crops
travel as they are cut: (n, size, size, 3) uint8, a quarter of float32's bytes.

Ray is imported only by the functions that use it: nodes outside cluster mode never load it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from estimators import CropSpec, Estimator, create_estimator
from estimators.base import first_line, root_error
from stream.batcher import estimate_each
from stream.config import EstimatorConfig
from stream.connections import RateLimiter
from stream.types import Estimates

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger(__name__)

APP_NAME = "agestream-estimator"
DEPLOYMENT_NAME = "estimator"
# A healthy service answers in its batch wait + one model call + a few ms of Ray: 8 faces
# through a CPU replica on the same 2-core machine took 32-36 ms (p95 40-54 ms) with a 5 ms
# batch wait, the node's own model 15-26 ms. A call 0.2 s late means a stalled or overloaded
# pool, where the node's own model is the better bet; 0.2 s is 5 frames at 25 fps, so a stall
# costs a stream a few frames, not seconds.
DEFAULT_TIMEOUT_S = 0.2
# After a failed call the node estimates locally this long before it tries the service again,
# so that a dead service does not cost every batch a full timeout.
DEFAULT_RETRY_S = 2.0
# Calls whose latency the mean and p95 cover.
LATENCY_WINDOW = 200

Crops = Mapping[CropSpec, np.ndarray]


@dataclasses.dataclass(frozen=True)
class EstimatorFactory:
    """Builds the configured estimator where it is called: the config travels, not the model."""

    config: EstimatorConfig
    models_dir: str | None = None

    def __call__(self) -> Estimator:
        return create_estimator(self.config, self.models_dir)


def faces_in(crops: Crops) -> int:
    """Faces in one request's crops (every spec holds as many)."""
    return len(next(iter(crops.values()))) if crops else 0


def total_faces(batch: list[Crops]) -> int:
    """Faces in a list of requests: the size `@serve.batch` compares with `max_batch`."""
    return sum(faces_in(crops) for crops in batch)


def _writable(estimates: Estimates) -> Estimates:
    """`estimates` with arrays of their own: Ray returns read-only views of its buffers, and
    a local model's arrays are writable."""
    arrays: dict[str, Any] = {
        field.name: np.array(value)
        for field in dataclasses.fields(estimates)
        if isinstance(value := getattr(estimates, field.name), np.ndarray)
    }
    return dataclasses.replace(estimates, **arrays)


class EstimatorReplica:
    """What one Serve replica holds: the model, and how a batch of requests runs through it.

    The model runs on the replica's event loop, one call at a time; the requests that arrive
    meanwhile queue up and form the next batch.
    """

    def __init__(self, factory: Callable[[], Estimator]) -> None:
        self.estimator = factory()
        self.calls = self.faces = self.requests = 0

    def run(self, batch: list[Crops]) -> list[Estimates]:
        """ONE model call for every request of `batch`; each request's rows, in order."""
        answers = estimate_each(self.estimator, batch)
        self.calls += 1
        self.faces += total_faces(batch)
        self.requests += len(batch)
        return answers

    def stats(self) -> dict[str, int]:
        """Model calls, faces and requests served so far."""
        return {"calls": self.calls, "faces": self.faces, "requests": self.requests}


def _replica_class(max_batch: int, max_wait_ms: float) -> type[EstimatorReplica]:
    """`EstimatorReplica` with a batching `estimate` entry (Serve's decorator fixes its limits
    when the class is made, so the class is made at deployment)."""
    from ray import serve

    class BatchingReplica(EstimatorReplica):
        @serve.batch(
            max_batch_size=max_batch,
            batch_wait_timeout_s=max_wait_ms / 1000.0,
            batch_size_fn=total_faces,
        )
        async def _batched(self, batch: list[Crops]) -> list[Estimates]:
            return self.run(batch)

        async def estimate(self, crops: Crops) -> Estimates:
            if faces_in(crops) > max_batch:  # serve.batch refuses one item over its size
                return self.run([crops])[0]
            return await self._batched(crops)

    return BatchingReplica


def deploy_estimator_service(
    estimator_config: EstimatorConfig,
    models_dir: str | Path | None,
    *,
    max_batch: int,
    max_wait_ms: float,
    num_gpus: float = 0,
    replicas: int = 1,
) -> None:
    """Run the estimator service for `estimator_config` on the connected Ray cluster.

    See `deploy_estimator_factory`; the replicas load the models from `models_dir`.
    """
    factory = EstimatorFactory(estimator_config, None if models_dir is None else str(models_dir))
    deploy_estimator_factory(
        factory, max_batch=max_batch, max_wait_ms=max_wait_ms, num_gpus=num_gpus, replicas=replicas
    )


def deploy_estimator_factory(
    factory: Callable[[], Estimator],
    *,
    max_batch: int,
    max_wait_ms: float,
    num_gpus: float = 0,
    replicas: int = 1,
) -> None:
    """Run `APP_NAME` with `replicas` replicas that build their model with `factory`; returns
    once they are ready. An application already running is kept as it is (idempotent):
    `shutdown_estimator_service` first to change it.

    Args:
        factory: picklable, called once on each replica.
        max_batch: most faces in one model call (a larger single request goes alone).
        max_wait_ms: how long a batch waits for more requests after its first.
        num_gpus: GPUs each replica reserves; replicas reserve no CPU, which the streams need.
        replicas: how many replicas (model copies) share the requests.

    Raises:
        ValueError: a bad argument.
        RuntimeError: Ray is not initialized in this process.
    """
    _check_service_arguments(max_batch, max_wait_ms, num_gpus, replicas)
    import ray
    from ray import serve

    if not ray.is_initialized():
        raise RuntimeError("estimator service: call ray.init(address=...) before deploying it")
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy on any node
    application = serve.status().applications.get(APP_NAME)
    if application is not None and application.status == "RUNNING":
        log.info("estimator service %r is already running; kept as it is", APP_NAME)
        return
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=replicas,
        # Requests wait in the replica to be batched: room for a full batch of one-face
        # requests running and the next one filling.
        max_ongoing_requests=2 * max_batch,
        ray_actor_options={"num_cpus": 0, "num_gpus": num_gpus},
        # Not a line per call in every log (the head's included): warnings and errors only.
        logging_config={"enable_access_log": False, "log_level": "WARNING"},
    )(_replica_class(max_batch, max_wait_ms))
    serve.run(deployment.bind(factory), name=APP_NAME, route_prefix=None, blocking=False)
    log.info("estimator service %r running: %d replica(s)", APP_NAME, replicas)


def _check_service_arguments(
    max_batch: int, max_wait_ms: float, num_gpus: float, replicas: int
) -> None:
    if max_batch < 1:
        raise ValueError(f"estimator service max_batch must be at least 1, but got {max_batch}")
    if max_wait_ms < 0:
        raise ValueError(f"estimator service max_wait_ms must be >= 0, but got {max_wait_ms}")
    if num_gpus < 0:
        raise ValueError(f"estimator service num_gpus must be >= 0, but got {num_gpus}")
    if replicas < 1:
        raise ValueError(f"estimator service replicas must be at least 1, but got {replicas}")


def shutdown_estimator_service() -> None:
    """Delete `APP_NAME` from the connected cluster, waiting for its replicas to stop; nothing
    when Ray or Serve is not running. Serve itself stays up (other applications may use it)."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
    except RayServeException:  # no Serve controller: nothing deployed
        return


class ServiceEstimator:
    """An `Estimator` that asks the estimator service and falls back to `local`.

    Each `estimate` is one call to the service, answered within `timeout_s` or cancelled; a
    timeout or any error of the service is answered by `local.estimate` instead (logged the
    first time, then at most once per `RateLimiter` period per kind), and the next `retry_s`
    seconds go straight to `local`. The handle is got on the first call (the service may be
    deployed after the node starts) and again after an error. Ray must be initialized in this
    process (`ray.init(address=...)`); until it is, every call is local.

    Args:
        local: this node's own model; also gives `name`, `predicts` and `crops`.
        timeout_s: the longest a call waits for the service.
        retry_s: how long after a failed call the service is left alone.

    Safe from any thread; `stats()` gives the figures for /metrics.
    """

    def __init__(
        self,
        local: Estimator,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"ServiceEstimator timeout_s must be positive, but got {timeout_s}")
        if retry_s < 0:
            raise ValueError(f"ServiceEstimator retry_s must be >= 0, but got {retry_s}")
        self.local = local
        self.name = local.name
        self.predicts = tuple(getattr(local, "predicts", ()))
        self.crops = tuple(local.crops)
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._handle: DeploymentHandle | None = None
        self._retry_at = 0.0  # monotonic time before which calls stay local
        self._lock = threading.Lock()
        self._limiter = RateLimiter()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._calls = self._fallbacks = self._timeouts = 0
        self._latency_sum_s = 0.0

    def estimate(self, crops: Crops) -> Estimates:
        """The service's estimates of `crops`, or `local`'s when it fails or is too slow."""
        if faces_in(crops) == 0 or time.monotonic() < self._retry_at:
            if faces_in(crops):
                self._count_fallback()
            return self.local.estimate(crops)
        start = time.monotonic()
        try:
            estimates = self._ask_service(crops)
        except Exception as error:  # any failure of the service: the node answers itself
            self._record(start)
            self._fail(error)
            return self.local.estimate(crops)
        self._record(start)
        return estimates

    def _ask_service(self, crops: Crops) -> Estimates:
        response = self._get_handle().estimate.remote(crops)
        try:
            estimates: Estimates = response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            response.cancel()  # the replica drops it unless its batch already runs
            raise
        return _writable(estimates)

    def _get_handle(self) -> DeploymentHandle:
        with self._lock:
            if self._handle is None:
                import ray
                from ray import serve

                if not ray.is_initialized():  # Serve would start a new local cluster
                    raise RuntimeError("Ray is not initialized in this process")
                self._handle = serve.get_app_handle(APP_NAME)
            return self._handle

    def _record(self, start: float) -> None:
        took = time.monotonic() - start
        with self._lock:
            self._calls += 1
            self._latencies.append(took)
            self._latency_sum_s += took

    def _count_fallback(self) -> None:
        with self._lock:
            self._fallbacks += 1

    def _fail(self, error: Exception) -> None:
        timed_out = isinstance(error, TimeoutError)
        with self._lock:
            self._fallbacks += 1
            self._timeouts += timed_out
            self._retry_at = time.monotonic() + self.retry_s
            if not timed_out:  # the service may have gone or moved: find it again
                self._handle = None
            kind = "timeout" if timed_out else type(error).__name__
            left_out = self._limiter.allow(kind)
        if left_out is None:
            return
        # A replica's error arrives wrapped in a RayTaskError whose first line is the replica.
        reason = first_line(root_error(error))
        what = f"no answer within {self.timeout_s:g} s" if timed_out else reason.rstrip(".")
        until = f" for the next {self.retry_s:g} s" if self.retry_s else ""
        suffix = f" ({left_out} more like it not logged)" if left_out else ""
        log.warning(
            "estimator service %r: %s; estimating on this node%s%s", APP_NAME, what, until, suffix
        )

    def stats(self) -> dict[str, Any]:
        """Figures for /metrics: `calls` to the service, `fallbacks` (batches estimated locally
        because of a failed call or after one), `timeouts` (of the calls), the call latency's
        mean and p95 (ms) over the last LATENCY_WINDOW calls (None before any), and its total
        (`latency_sum_s`, `latency_count`) for a Prometheus summary. A call's latency ends at
        its answer or its timeout."""
        with self._lock:
            latencies = np.asarray(self._latencies, np.float64)
            return {
                "calls": self._calls,
                "fallbacks": self._fallbacks,
                "timeouts": self._timeouts,
                "latency_mean_ms": float(latencies.mean() * 1000) if len(latencies) else None,
                "latency_p95_ms": (
                    float(np.percentile(latencies, 95) * 1000) if len(latencies) else None
                ),
                "latency_sum_s": self._latency_sum_s,
                "latency_count": self._calls,
            }
