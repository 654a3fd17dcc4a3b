"""One estimator shared by many streams: their requests batched into one model call.

`EstimateBatcher` is itself an `Estimator` (`name`, `predicts`, `crops`, `estimate`), so each
stream's `FaceAnalyzer` uses it unchanged. `estimate`, called on any stream's processing
thread, queues the crops and waits for its own rows; one thread owns the model: it takes
requests until `max_batch` faces are waiting or `max_wait_ms` has passed since the first,
concatenates the crops of each `CropSpec`, makes ONE `estimate` call and hands each request
its rows back, in order. A failed call is retried request by request, so that an error
reaches only the callers whose crops caused it; a caller that waits longer than `timeout_s`
gets a `BatcherError` (its processor skips that frame) and no stream waits on another.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from estimators import CropSpec, Estimator
from stream.types import Estimates

log = logging.getLogger(__name__)

# How often the model thread looks at the stop event while idle.
POLL_S = 0.1
# A thread that asked for estimates this recently may ask again soon: a call waits for it
# (up to max_wait_ms); once every such thread's request is in, the call goes at once.
ACTIVE_CALLER_S = 2.0
# The longest a caller waits for its estimates: the model's first calls (allocation) included.
DEFAULT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 2.0


class BatcherError(RuntimeError):
    """A request was not answered: the batcher is closed or the model took too long."""


@dataclasses.dataclass(eq=False)
class _Request:
    crops: Mapping[CropSpec, np.ndarray]
    faces: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Estimates | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def answer(self, result: Estimates | None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


def take_rows(estimates: Estimates, start: int, stop: int) -> Estimates:
    """Rows `start:stop` of every column, optional ones too (labels are shared)."""
    columns: dict[str, Any] = {}  # arrays, and the labels' tuple
    for field in dataclasses.fields(estimates):
        value = getattr(estimates, field.name)
        columns[field.name] = value[start:stop] if isinstance(value, np.ndarray) else value
    return Estimates(**columns)


def estimate_each(
    estimator: Estimator, requests: Sequence[Mapping[CropSpec, np.ndarray]]
) -> list[Estimates]:
    """ONE model call for the crops of every request, one after another, and each request's
    rows of the answer, in order; RuntimeError when the model answers another number of rows."""
    crops = {spec: np.concatenate([crops[spec] for crops in requests]) for spec in estimator.crops}
    estimates = estimator.estimate(crops)
    sizes = [len(request[estimator.crops[0]]) for request in requests]
    if len(estimates) != sum(sizes):
        raise RuntimeError(
            f"estimator {estimator.name!r} returned {len(estimates)} estimates for "
            f"{sum(sizes)} faces"
        )
    answers, start = [], 0
    for size in sizes:
        answers.append(take_rows(estimates, start, start + size))
        start += size
    return answers


class EstimateBatcher:
    """Batches `estimate` calls from many threads into one call of `estimator`.

    Args:
        estimator: the model; only the batcher's own thread calls it.
        max_batch: a call takes requests until this many faces (a larger single request
            goes alone).
        max_wait_ms: how long a call waits for more requests after the first.
        timeout_s: how long `estimate` waits for its answer.

    Counters: `calls` (successful model calls with faces), `faces`, `requests`, `errors` (requests
    answered with the model's error); `mean_batch` is faces per call.
    """

    def __init__(
        self,
        estimator: Estimator,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"EstimateBatcher max_batch must be at least 1, but got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"EstimateBatcher max_wait_ms must be >= 0, but got {max_wait_ms}")
        if timeout_s <= 0:
            raise ValueError(f"EstimateBatcher timeout_s must be positive, but got {timeout_s}")
        self.estimator = estimator
        self.name = estimator.name
        self.predicts = getattr(estimator, "predicts", ())
        self.crops = tuple(estimator.crops)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.calls = self.faces = self.requests = self.errors = 0
        self._empty: Estimates | None = None  # the model's answer to no faces, once known
        self._pending: deque[_Request] = deque()
        self._callers: dict[int, float] = {}  # thread id -> when it last asked
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="estimate-batcher", daemon=True)
        self._thread.start()

    @property
    def mean_batch(self) -> float:
        return self.faces / self.calls if self.calls else 0.0

    def _faces_in(self, crops: Mapping[CropSpec, np.ndarray]) -> int:
        """How many faces `crops` holds; ValueError when a spec is missing or counts differ."""
        counts = set()
        for spec in self.crops:
            if spec not in crops:
                raise ValueError(f"crops lack {spec} that estimator {self.name!r} needs")
            array = crops[spec]
            if array.ndim != 4 or array.shape[1:] != (spec.size, spec.size, 3):
                raise ValueError(
                    f"crops for {spec} must have shape (n, {spec.size}, {spec.size}, 3), "
                    f"but got {array.shape}"
                )
            counts.add(len(array))
        if len(counts) > 1:
            raise ValueError(f"crops must hold as many faces for every spec, but got {counts}")
        return counts.pop() if counts else 0

    def estimate(self, crops: Mapping[CropSpec, np.ndarray]) -> Estimates:
        """The estimates of `crops`, computed in a batch with other threads' requests.

        Raises:
            BatcherError: closed, or no answer within `timeout_s`.
            ValueError: malformed crops.
            Exception: what the model raised on these crops.
        """
        faces = self._faces_in(crops)
        if faces == 0 and self._empty is not None:
            return self._empty
        request = _Request(crops, faces)
        with self._cond:
            if self._stop.is_set():
                raise BatcherError("estimate batcher is closed")
            self._pending.append(request)
            self._callers[threading.get_ident()] = time.monotonic()
            self._cond.notify_all()
        if not request.done.wait(self.timeout_s):
            with self._cond:
                request.abandoned = True
                if request in self._pending:
                    self._pending.remove(request)
            raise BatcherError(f"no estimates within {self.timeout_s:g} s ({faces} faces)")
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _take(self) -> list[_Request]:
        """The next batch: requests until max_batch faces or max_wait after the first; [] when
        stopped or idle for POLL_S."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending or self._stop.is_set(), POLL_S):
                return []
            if self._stop.is_set():
                return []
            batch = [self._pending.popleft()]
            total = batch[0].faces
            deadline = time.monotonic() + self.max_wait_s
            callers = self._active_callers(time.monotonic())
            while total < self.max_batch and len(batch) < callers and not self._stop.is_set():
                if not self._pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
                    continue
                if total + self._pending[0].faces > self.max_batch:
                    break  # the next call takes it
                batch.append(self._pending.popleft())
                total += batch[-1].faces
            return [request for request in batch if not request.abandoned]

    def _active_callers(self, now: float) -> int:
        """Threads that asked within ACTIVE_CALLER_S (forgetting the others); with the lock."""
        for ident in [i for i, at in self._callers.items() if now - at > ACTIVE_CALLER_S]:
            del self._callers[ident]
        return len(self._callers)

    def _run_batch(self, batch: list[_Request]) -> None:
        try:
            answers = estimate_each(self.estimator, [request.crops for request in batch])
        except Exception as error:
            if len(batch) > 1:  # find whose crops failed: the others still get their rows
                for request in batch:
                    self._run_batch([request])
                return
            batch[0].answer(None, error)
            self.errors += 1
            return
        for request, answer in zip(batch, answers, strict=True):
            request.answer(answer)
        self._empty = take_rows(answers[0], 0, 0)
        faces = sum(request.faces for request in batch)
        self.calls += faces > 0  # the one call that learns the empty answer is no batch
        self.faces += faces
        self.requests += len(batch)

    def _serve(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if batch:
                self._run_batch(batch)
        self._refuse_pending()

    def _refuse_pending(self) -> None:
        with self._cond:
            left, self._pending = list(self._pending), deque()
        for request in left:
            request.answer(None, BatcherError("estimate batcher is closed"))

    def close(self) -> None:
        """Stop the model thread; requests still waiting get a BatcherError at once, and a
        model call in progress is waited for at most JOIN_TIMEOUT_S. Never hangs."""
        with self._cond:
            self._stop.set()
            self._cond.notify_all()
        self._refuse_pending()
        if self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("estimate batcher: the model call in progress did not end in time")

    def __enter__(self) -> EstimateBatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
