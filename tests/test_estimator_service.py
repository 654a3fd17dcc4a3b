"""The estimator service on a real local Ray cluster: answers equal to the node's own model,
many callers' batches merged into one model call, and the node's own model answering when
the service is too slow, failing or not there."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED, require

ray = pytest.importorskip("ray", reason="needs ray[serve] (cluster mode)")
serve = pytest.importorskip("ray.serve", reason="needs ray[serve] (cluster mode)")

from estimators import create_estimator  # noqa: E402
from stream.config import EstimatorConfig  # noqa: E402
from stream.estimator_service import (  # noqa: E402
    APP_NAME,
    ServiceEstimator,
    deploy_estimator_factory,
    deploy_estimator_service,
    shutdown_estimator_service,
)

FACES_DEV = SHARED / "data" / "faces" / "dev"
COLUMNS = ("age", "p_male", "age_confidence", "age_raw", "age_std", "age_low", "age_high")
# The replica's batch limit: the three concurrent callers' 3 + 2 + 1 faces fit one call; the
# 8-face request goes alone.
MAX_BATCH = 6


def ray_pids(temp_dir: Path) -> list[int]:
    """Processes of the cluster whose files are under `temp_dir` (every Ray process names its
    session directory on its command line)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(temp_dir).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return pids


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A Ray cluster of this test's own (never one that is already running here), with files
    under a short temporary directory (Ray's socket paths must stay short); no process of it
    is left afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="ray_es_", dir="/tmp"))
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        deadline = time.monotonic() + 15
        while ray_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = ray_pids(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def local():
    return create_estimator(EstimatorConfig())


@pytest.fixture(scope="module")
def face_crops(local) -> list[dict]:
    """One-face crops of the default estimator's specs, cut from 8 development faces."""
    import cv2

    from detectors import create_detector
    from stream.analyzer import cut_crops
    from stream.config import DetectorConfig

    images = sorted(require(FACES_DEV).glob("*/*.jpg"))[::500]
    crops = []
    with create_detector(DetectorConfig(), 200) as detector:
        for path in images:
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            faces = detector.detect(rgb)[:1]
            if len(faces):
                crops.append({spec: cut_crops(rgb, faces, spec) for spec in local.crops})
    assert len(crops) >= 8, "faces found in the development images"
    return crops[:8]


def batch_of(face_crops: list[dict], start: int, stop: int) -> dict:
    return {
        spec: np.concatenate([c[spec] for c in face_crops[start:stop]]) for spec in face_crops[0]
    }


def assert_same(one, other) -> None:
    for name in COLUMNS:
        a, b = getattr(one, name), getattr(other, name)
        assert (a is None) == (b is None), name
        if a is not None:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def replica_stats() -> dict:
    return serve.get_app_handle(APP_NAME).stats.remote().result(timeout_s=10)


@dataclasses.dataclass(frozen=True)
class SlowFactory:
    """The default estimator, each call `delay_s` late (the replica imports this module)."""

    delay_s: float

    def __call__(self) -> SlowEstimator:
        return SlowEstimator(create_estimator(EstimatorConfig()), self.delay_s)


class SlowEstimator:
    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.name, self.predicts, self.crops = inner.name, inner.predicts, inner.crops

    def estimate(self, crops):
        time.sleep(self.delay_s)
        return self.inner.estimate(crops)


def test_given_no_service_when_estimating_then_local_answers_and_one_log_line(
    cluster, local, face_crops, caplog
) -> None:
    shutdown_estimator_service()  # none deployed: nothing happens
    crops = batch_of(face_crops, 0, 3)
    estimator = ServiceEstimator(local, timeout_s=1.0, retry_s=0)
    with caplog.at_level(logging.WARNING, "stream.estimator_service"):
        answers = [estimator.estimate(crops) for _ in range(3)]

    for answer in answers:
        assert_same(answer, local.estimate(crops))
    stats = estimator.stats()
    assert (stats["calls"], stats["fallbacks"], stats["timeouts"]) == (3, 3, 0)
    warnings = [r for r in caplog.records if r.name == "stream.estimator_service"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "estimating on this node" in warnings[0].getMessage()


def test_given_service_when_estimating_real_crops_then_equal_to_local(
    cluster, local, face_crops
) -> None:
    shutdown_estimator_service()  # a fresh replica
    deploy_estimator_service(EstimatorConfig(), None, max_batch=MAX_BATCH, max_wait_ms=200)
    crops = batch_of(face_crops, 0, 8)  # over MAX_BATCH: goes alone, without the batch wait
    estimator = ServiceEstimator(local, timeout_s=10)

    answer = estimator.estimate(crops)

    assert_same(answer, local.estimate(crops))
    assert answer.age.flags.writeable, "arrays of its own, as the local model's"
    assert replica_stats() == {"calls": 1, "faces": 8, "requests": 1}
    assert estimator.stats()["fallbacks"] == 0
    started = time.monotonic()
    deploy_estimator_service(EstimatorConfig(), None, max_batch=MAX_BATCH, max_wait_ms=200)
    assert time.monotonic() - started < 2, "a running service is kept"
    assert replica_stats()["calls"] == 1, "the same replica"


def test_given_concurrent_callers_when_estimating_then_one_call_and_each_its_rows(
    cluster, local, face_crops
) -> None:
    deploy_estimator_service(EstimatorConfig(), None, max_batch=MAX_BATCH, max_wait_ms=200)
    requests = [batch_of(face_crops, 0, 3), batch_of(face_crops, 3, 5), batch_of(face_crops, 5, 6)]
    estimator = ServiceEstimator(local, timeout_s=10)
    estimator.estimate(requests[2])  # the handle's router learns the replicas
    before = replica_stats()
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def call(index: int) -> None:
        start.wait()
        answers[index] = estimator.estimate(requests[index])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    after = replica_stats()
    assert after["requests"] - before["requests"] == 3
    assert after["faces"] - before["faces"] == 6
    assert after["calls"] - before["calls"] < len(requests), "requests merged by serve.batch"
    for request, answer in zip(requests, answers):
        assert_same(answer, local.estimate(request))
    stats = estimator.stats()
    assert (stats["calls"], stats["fallbacks"]) == (4, 0)


def test_given_slow_service_when_estimating_then_local_answers_in_time_and_call_cancelled(
    cluster, local, face_crops
) -> None:
    shutdown_estimator_service()
    deploy_estimator_factory(SlowFactory(2.0), max_batch=32, max_wait_ms=5)
    crops = batch_of(face_crops, 0, 4)
    first, second = ServiceEstimator(local, timeout_s=0.3), ServiceEstimator(local, timeout_s=0.3)
    assert replica_stats()["requests"] == 0  # and this process's router knows the replica
    thread = threading.Thread(target=first.estimate, args=(crops,))
    thread.start()  # its call occupies the model for 2 s
    time.sleep(0.2)

    started = time.monotonic()
    answer = second.estimate(crops)  # queued behind it
    took = time.monotonic() - started
    thread.join(5)

    assert_same(answer, local.estimate(crops))
    assert took < 0.3 + 0.5, f"answered in {took:.2f} s"
    stats = second.stats()
    assert (stats["calls"], stats["fallbacks"], stats["timeouts"]) == (1, 1, 1)
    assert first.stats()["timeouts"] == 1
    assert stats["latency_p95_ms"] == pytest.approx(300, abs=150)
    started = time.monotonic()
    second.estimate(crops)  # within retry_s: local, without a call
    assert second.stats()["calls"] == 1
    assert time.monotonic() - started < 0.3
    time.sleep(2.5)  # the first call's model run ends
    assert replica_stats()["requests"] == 1, "the cancelled call was never run"
    shutdown_estimator_service()


def test_given_bad_arguments_then_value_errors(local) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        ServiceEstimator(local, timeout_s=0)
    with pytest.raises(ValueError, match="max_batch"):
        deploy_estimator_factory(SlowFactory(0), max_batch=0, max_wait_ms=5)
