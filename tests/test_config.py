from __future__ import annotations

import importlib.util
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import stream
from stream.cli import _config_from, build_parser, main
from stream.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    load_config,
    override,
    stream_config,
)

REPO = Path(__file__).resolve().parents[1]
# Building agestream's wheel takes a few seconds; beyond this the machine is too busy to wait.
WHEEL_BUILD_LIMIT_S = 120
# What the wheel test leaves out of its copy of the checkout: VCS, environments, build output.
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "runs",
    "*.mp4",
    "*.jsonl",
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_given_packaged_config_when_loaded_then_it_equals_the_defaults() -> None:
    assert load_config(DEFAULT_CONFIG_PATH) == Config()


def test_given_default_config_path_then_it_is_inside_the_stream_package() -> None:
    package = Path(stream.__file__).resolve().parent
    assert DEFAULT_CONFIG_PATH.parent == package
    assert DEFAULT_CONFIG_PATH.is_file() and not DEFAULT_CONFIG_PATH.is_symlink()
    assert (REPO / "config.yaml").resolve() == DEFAULT_CONFIG_PATH, "top-level link is broken"


def test_given_a_built_wheel_then_it_holds_the_packaged_config(tmp_path: Path) -> None:
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed in this environment")
    # Built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds, and
    # stale files in build/lib would go into later wheels.
    source = tmp_path / "agestream"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = tmp_path / "wheels"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    try:
        built = subprocess.run(
            [*command, str(source)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=WHEEL_BUILD_LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"building the wheel took over {WHEEL_BUILD_LIMIT_S} s")
    assert built.returncode == 0, built.stderr[-4000:]
    (wheel,) = wheels.glob("agestream-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        member = archive.getinfo("stream/config.yaml")
        mode = member.external_attr >> 16
        assert stat.S_ISREG(mode) or mode == 0, f"not a regular file in the wheel: {oct(mode)}"
        assert archive.read(member) == DEFAULT_CONFIG_PATH.read_bytes()


def test_given_packaged_config_then_every_key_has_a_comment_above_it() -> None:
    lines = DEFAULT_CONFIG_PATH.read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[a-z_]+:", line):
            above = lines[number - 1].strip()
            assert above.startswith("#"), f"config.yaml line {number + 1} {line!r} has no comment"


def test_given_unknown_top_level_key_then_error_names_it_and_the_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "detectr:\n  model: full\n"))
    message = str(error.value)
    assert "'detectr'" in message
    assert "detector, estimator, events, models_dir, output, serve, source, tracking" in message


def test_given_unknown_nested_key_then_error_names_its_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'detector\.min_conf'.*min_confidence"):
        load_config(write(tmp_path, "detector:\n  min_conf: 0.3\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("detector:\n  model: medium\n", "detector.model: Input should be 'short', 'full' or"),
        ("detector:\n  min_confidence: 1.5\n", "min_confidence: Input should be less than 1"),
        ("source:\n  queue_size: 0\n", "source.queue_size: Input should be greater than or"),
        ("estimator:\n  providers: []\n", "estimator.providers: Tuple should have at least 1"),
        ("detector: [1, 2]\n", "detector must be a mapping"),
        ("detector:\n  model: [\n", "not valid YAML"),
        # Each below was accepted, or failed later without naming the key (issue 11, case 10).
        ("detector:\n  min_face_px: .nan\n", "detector.min_face_px: Input should be a valid"),
        ("estimator:\n  threads: 9999\n", "estimator.threads: Input should be less than or"),
        ("detector:\n  min_confidence: 1e-9\n", "YAML read it as text"),
        ("source:\n  queue_size: '8'\n", "source.queue_size: Input should be a valid integer"),
        ("estimator:\n  providers: CPUExecutionProvider\n", "write a list, e.g."),
        ("output:\n  window: 'no'\n", "output.window: Input should be a valid boolean"),
        ("tracking:\n  lifetime_s: .inf\n", "tracking.lifetime_s: Input should be a finite"),
        ("- just\n- a list\n", "config must be a mapping, but got list"),
    ],
)
def test_given_bad_value_then_config_error_says_what(
    tmp_path: Path, text: str, expected: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(256)) * 4, "is not a text file (not UTF-8)"),
        (b"detector:\n  model: short\x00\x01\n", "is not a text file (it has NUL bytes)"),
        (b"just some words\n", "config must be a mapping, but got str"),
    ],
)
def test_given_a_malformed_file_when_cli_runs_then_one_line_naming_it_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    code = main(["run", "0", "--config", str(path), "--no-window"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and str(path) in err[0] and expected in err[0]


def test_given_a_bad_flag_value_then_config_error_names_the_key() -> None:
    with pytest.raises(ConfigError, match="output.max_frames: Input should be greater than"):
        override(load_config(), "output", max_frames=0)


def test_given_missing_config_file_then_error_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_given_file_values_when_flags_given_then_flags_win(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "detector:\n  model: short\n  min_confidence: 0.7\n"))
    changed = override(config, "detector", model="full", min_confidence=None)
    assert changed.detector.model == "full"
    assert changed.detector.min_confidence == 0.7


def test_given_unknown_key_when_cli_runs_then_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "outputs:\n  video: x.mp4\n")
    code = main(["run", "0", "--config", str(path), "--no-window"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        f"agestream: config error: {path}: unknown config key 'outputs'; "
        "valid keys here: detector, estimator, events, models_dir, output, serve, source, tracking"
    ]


def test_given_serve_streams_when_loaded_then_entries_are_checked(tmp_path: Path) -> None:
    text = (
        "serve:\n  port: 9000\n  streams:\n    - {id: door, source: door.mp4}\n    - {source: 0}\n"
    )
    serve = load_config(write(tmp_path, text)).serve

    assert serve.port == 9000
    assert [(s.id, s.source) for s in serve.streams] == [("door", "door.mp4"), (None, 0)]
    with pytest.raises(
        ConfigError, match=r"'serve\.streams\[0\]\.url'.*id, labels, roi, settings, source"
    ):
        load_config(write(tmp_path, "serve:\n  streams:\n    - {url: x}\n"))
    with pytest.raises(ConfigError, match=r"serve\.port"):
        load_config(write(tmp_path, "serve:\n  port: 70000\n"))


def test_given_a_keep_margin_beyond_the_gender_margin_then_one_line_naming_both(
    tmp_path: Path,
) -> None:
    config = write(tmp_path, "tracking:\n  gender_margin: 0.2\n  gender_keep_margin: 0.3\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert str(error.value) == (
        f"{config}: tracking: gender_keep_margin (0.3) must not exceed gender_margin (0.2)"
    )


def test_given_serve_allowed_hosts_when_loaded_then_each_must_be_a_host(tmp_path: Path) -> None:
    text = 'serve:\n  allowed_hosts: [camera-box.local, "192.168.1.20:8080", "[::1]"]\n'
    serve = load_config(write(tmp_path, text)).serve
    assert serve.allowed_hosts == ("camera-box.local", "192.168.1.20:8080", "[::1]")
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "serve:\n  allowed_hosts: [http://box.local]\n"))
    assert str(error.value).endswith(
        "but got 'http://box.local'; write a host name or address with an optional :port, "
        "e.g. box.local:8080"
    )
    flags = build_parser().parse_args(["serve", "--allowed-host", "a.lan", "--allowed-host", "b"])
    assert _config_from(flags).serve.allowed_hosts == ("a.lan", "b")


def test_given_a_streams_region_and_settings_then_they_are_checked_and_apply_to_it_alone(
    tmp_path: Path,
) -> None:
    text = (
        "serve:\n  streams:\n    - {id: hall, source: a.mp4, roi: [0.25, 0, 0.75, 1],\n"
        "       settings: {detector: {min_face_px: 40}, output: {blur: true}}}\n"
    )
    config = load_config(write(tmp_path, text))
    (entry,) = config.serve.streams
    own = stream_config(config, entry)
    assert entry.roi == (0.25, 0.0, 0.75, 1.0)
    assert (own.detector.min_face_px, own.output.blur) == (40, True)
    assert (config.detector.min_face_px, config.output.blur) == (20, False)
    for bad, message in (
        ("roi: [0.8, 0, 0.2, 1]", r"streams\[0\]: roi is \[left, top, right, bottom\]"),
        ("roi: [0, 0, 1.5, 1]", r"roi\.2: Input should be less than or equal to 1"),
        ("settings: {serve: {port: 1}}", r"settings may set detector, source, tracking, output"),
        (
            "settings: {detector: {min_face_px: x}}",
            r"streams\[0\]\.settings\.detector\.min_face_px",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, f"serve:\n  streams:\n    - {{source: a.mp4, {bad}}}\n"))
