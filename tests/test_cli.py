"""The command line's own behaviour: --version, and estimator names checked before anything
opens."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from estimators import estimator_names
from stream.cli import main

REPO = Path(__file__).resolve().parents[1]
UNKNOWN_NOPE = "agestream: config error: Invalid estimator 'nope', expecting one of: " + ", ".join(
    estimator_names()
)


def test_given_version_flag_then_it_prints_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"agestream {importlib.metadata.version('agestream')}\n"


def test_given_unknown_estimator_then_run_fails_before_source_and_detector() -> None:
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "stream", "run", "rtsp://127.0.0.1:9/none"]
        + ["--estimator", "nope", "--no-window"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert time.monotonic() - started < 5
    assert completed.returncode == 2
    assert completed.stderr.strip() == UNKNOWN_NOPE
    for never_reached in ("rtsp", "127.0.0.1", "source", "detector", "BlazeFace"):
        assert never_reached not in completed.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "no-such-folder", "--estimator", "nope"],
        ["bench", "--estimator", "nope"],
        ["run", "no-such-folder", "--estimator", "nope", "--output", "out"],
    ],
)
def test_given_unknown_estimator_then_every_estimator_command_fails_first(argv, capsys) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == UNKNOWN_NOPE


@pytest.mark.parametrize("key", ["name", "age", "gender"])
def test_given_unknown_estimator_in_config_file_then_error_names_file_and_key(
    key: str, tmp_path: Path, capsys
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"estimator:\n  {key}: nope\n")
    assert main(["run", "rtsp://127.0.0.1:9/none", "--config", str(config), "--no-window"]) == 2
    assert capsys.readouterr().err.strip() == UNKNOWN_NOPE.replace(
        "config error: ", f"config error: {config}: estimator.{key}: "
    )


def test_given_age_only_estimator_for_gender_in_config_then_refused_before_loading(
    tmp_path: Path, capsys
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("estimator:\n  gender: vit-fairface\n")
    assert main(["evaluate", "no-such-folder", "--config", str(config)]) == 2
    assert "estimator.gender: 'vit-fairface' does not predict gender" in capsys.readouterr().err
