"""EstimateBatcher: many threads' requests, one model call, each caller its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from estimators import CropSpec
from stream.batcher import BatcherError, EstimateBatcher
from stream.types import Estimates
from tests.conftest import VIDEOS, require

CHIP = CropSpec(4)
BOX = CropSpec(2, "box")
POISON = 255  # a crop starting with this makes the fake model raise


class FakeEstimator:
    """Age = the first pixel of each CHIP crop, p_male = that of the BOX crop; records the
    size of every call; `gate` (when set up) holds calls until it is opened."""

    name = "fake"
    predicts = ("age", "gender")
    crops = (CHIP, BOX)

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate: threading.Event | None = None
        self.called = threading.Event()

    def estimate(self, crops):
        self.called.set()
        if self.gate is not None:
            self.gate.wait(10)
        chip, box = crops[CHIP], crops[BOX]
        self.sizes.append(len(chip))
        if np.any(chip[:, 0, 0, 0] == POISON):
            raise ValueError("poisoned crop")
        age = chip[:, 0, 0, 0].astype(np.float32)
        return Estimates(
            age=age,
            p_male=box[:, 0, 0, 0].astype(np.float32) / 100,
            age_confidence=np.ones(len(age), np.float32),
            age_groups=np.stack([age, -age], axis=1),
            age_group_labels=("a", "b"),
            age_std=age / 10,
        )


def request(*values: int) -> dict:
    """Crops for faces whose first pixels are `values`."""
    chip = np.zeros((len(values), 4, 4, 3), np.uint8)
    box = np.zeros((len(values), 2, 2, 3), np.uint8)
    chip[:, 0, 0, 0] = values
    box[:, 0, 0, 0] = [v // 2 for v in values]
    return {CHIP: chip, BOX: box}


def submit_while_held(batcher: EstimateBatcher, fake: FakeEstimator, requests: list[dict]):
    """Hold the model on a first one-face call, queue `requests` from threads meanwhile,
    release: their futures, answered by the calls after the first."""
    fake.gate = threading.Event()
    pool = ThreadPoolExecutor(len(requests) + 1)
    blocker = pool.submit(batcher.estimate, request(1))
    assert fake.called.wait(5), "the first call started"
    futures = []
    for crops in requests:
        futures.append(pool.submit(batcher.estimate, crops))
        while len(batcher._pending) < len(futures):  # queued in this order
            time.sleep(0.002)
    fake.gate.set()
    blocker.result(5)
    pool.shutdown(wait=False)
    return futures


def test_given_concurrent_requests_when_batched_then_one_call_and_each_caller_its_rows() -> None:
    fake = FakeEstimator()
    with EstimateBatcher(fake, max_batch=32, max_wait_ms=5) as batcher:
        futures = submit_while_held(batcher, fake, [request(10, 11), request(20), request(30, 31)])
        results = [future.result(5) for future in futures]

    assert fake.sizes == [1, 5], "the three waiting requests went in one call"
    assert [list(r.age) for r in results] == [[10, 11], [20], [30, 31]]
    assert list(results[2].p_male) == pytest.approx([0.15, 0.15])
    assert results[0].age_groups.tolist() == [[10, -10], [11, -11]]
    assert results[0].age_group_labels == ("a", "b")
    assert list(results[1].age_std) == pytest.approx([2.0])
    assert (batcher.calls, batcher.faces, batcher.requests) == (2, 6, 4)
    assert batcher.mean_batch == 3.0


def test_given_more_faces_than_max_batch_when_batched_then_calls_split_at_request_bounds() -> None:
    fake = FakeEstimator()
    with EstimateBatcher(fake, max_batch=4, max_wait_ms=5) as batcher:
        futures = submit_while_held(
            batcher, fake, [request(1, 2), request(3, 4), request(5, 6), request(*range(7, 13))]
        )
        results = [future.result(5) for future in futures]

    assert fake.sizes == [1, 4, 2, 6], "a request larger than max_batch goes alone"
    assert [list(r.age) for r in results] == [[1, 2], [3, 4], [5, 6], list(range(7, 13))]


def test_given_max_wait_when_a_second_request_comes_within_it_then_both_in_one_call() -> None:
    fake = FakeEstimator()
    pools = [ThreadPoolExecutor(1), ThreadPoolExecutor(1)]  # two streams' threads
    with EstimateBatcher(fake, max_wait_ms=300) as batcher:
        for pool in pools:  # both become known callers
            pool.submit(batcher.estimate, request(0)).result(5)
        started = time.monotonic()
        first = pools[0].submit(batcher.estimate, request(1))
        time.sleep(0.05)
        second = pools[1].submit(batcher.estimate, request(2))
        assert list(first.result(5).age) == [1] and list(second.result(5).age) == [2]
        waited = time.monotonic() - started
        started = time.monotonic()
        alone = pools[0].submit(batcher.estimate, request(3))
        assert list(alone.result(5).age) == [3]
        waited_alone = time.monotonic() - started
    for pool in pools:
        pool.shutdown()

    assert fake.sizes[-2:] == [2, 1]
    assert waited < 0.25, "the call went as soon as both known callers were in"
    assert 0.25 < waited_alone < 2.0, "alone, the call waited max_wait for the other caller"


def test_given_one_caller_when_it_asks_then_no_wait_for_others() -> None:
    fake = FakeEstimator()
    with EstimateBatcher(fake, max_wait_ms=1000) as batcher:
        started = time.monotonic()
        for value in range(5):
            assert list(batcher.estimate(request(value)).age) == [value]
        assert time.monotonic() - started < 0.5


def test_given_no_wait_when_single_request_then_answered_at_once() -> None:
    fake = FakeEstimator()
    with EstimateBatcher(fake, max_wait_ms=0) as batcher:
        started = time.monotonic()
        assert list(batcher.estimate(request(7)).age) == [7]
        assert time.monotonic() - started < 0.5
        assert len(batcher.estimate(request())) == 0


def test_given_poisoned_request_in_batch_when_model_raises_then_only_its_caller_gets_it() -> None:
    fake = FakeEstimator()
    with EstimateBatcher(fake) as batcher:
        futures = submit_while_held(batcher, fake, [request(1), request(POISON, 2), request(3)])

        assert list(futures[0].result(5).age) == [1]
        with pytest.raises(ValueError, match="poisoned crop"):
            futures[1].result(5)
        assert list(futures[2].result(5).age) == [3]
        assert batcher.errors == 1


def test_given_malformed_crops_when_estimate_then_value_error_in_the_caller() -> None:
    with EstimateBatcher(FakeEstimator()) as batcher:
        with pytest.raises(ValueError, match="must have shape"):
            batcher.estimate({CHIP: np.zeros((1, 3, 3, 3), np.uint8), BOX: request(1)[BOX]})
        with pytest.raises(ValueError, match="as many faces"):
            batcher.estimate({CHIP: request(1, 2)[CHIP], BOX: request(1)[BOX]})


def test_given_stuck_model_when_closed_then_close_returns_and_callers_get_batcher_errors() -> None:
    fake = FakeEstimator()
    fake.gate = threading.Event()  # never opened until the end: the model hangs
    batcher = EstimateBatcher(fake, timeout_s=1.0)
    with ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(batcher.estimate, request(1))
        time.sleep(0.1)
        waiting = pool.submit(batcher.estimate, request(2))
        time.sleep(0.05)
        started = time.monotonic()
        batcher.close()
        closed_in = time.monotonic() - started

        with pytest.raises(BatcherError, match="closed"):
            waiting.result(1)
        with pytest.raises(BatcherError, match="no estimates within 1 s"):
            stuck.result(3)
    with pytest.raises(BatcherError, match="closed"):
        batcher.estimate(request(3))
    fake.gate.set()
    assert closed_in < 3.0


@pytest.fixture(scope="module")
def real_crops():
    """Crops of the default estimator's specs for the faces of a few frames of a shared clip."""
    import cv2

    from detectors import create_detector
    from estimators import create_estimator
    from stream.analyzer import cut_crops
    from stream.config import DetectorConfig, EstimatorConfig

    clip = require(VIDEOS / "livePortrait__driving__d3.mp4")
    estimator = create_estimator(EstimatorConfig())
    capture = cv2.VideoCapture(str(clip))
    per_frame = []
    with create_detector(DetectorConfig(), 512) as detector:
        for index in range(60):
            ok, image = capture.read()
            assert ok
            if index % 10:
                continue
            rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            faces = detector.detect(rgb)
            per_frame.append({spec: cut_crops(rgb, faces, spec) for spec in estimator.crops})
    capture.release()
    assert sum(len(next(iter(c.values()))) for c in per_frame) >= 5
    return estimator, per_frame


def test_given_real_estimator_when_batched_across_threads_then_equal_to_unbatched(
    real_crops,
) -> None:
    estimator, per_frame = real_crops
    # Mirrored crops too, so that requests differ and some hold two faces.
    requests = per_frame + [
        {spec: np.concatenate([c[spec], c[spec][:, :, ::-1]]) for spec in c} for c in per_frame
    ]
    alone = [estimator.estimate(crops) for crops in requests]

    with EstimateBatcher(estimator, max_wait_ms=50) as batcher, ThreadPoolExecutor(6) as pool:
        batched = list(pool.map(batcher.estimate, requests))

    assert batcher.calls < len(requests), "requests were batched"
    for one, many in zip(alone, batched):
        for name in ("age", "p_male", "age_confidence", "age_std", "age_raw"):
            a, b = getattr(one, name), getattr(many, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
