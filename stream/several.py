"""`agestream run` on several sources: the command line's sources with globs expanded, and the
output files each of them writes (one set per input, named after it)."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

from stream.config import ConfigError, OutputConfig
from stream.photos import is_image_source

GLOB_CHARACTERS = set("*?[")
# Each input's outputs in the --output, --json and --tracks folders.
SUFFIXES = {"video": ".mp4", "json": ".jsonl", "tracks": ".csv"}


def expand_sources(given: list[str]) -> list[str]:
    """`given` with each glob pattern replaced by the files it matches, sorted (a shell that
    expanded it already gives them as they are).

    Raises:
        ConfigError: a pattern that matches nothing; an image among several sources.
    """
    sources: list[str] = []
    for spec in given:
        if GLOB_CHARACTERS & set(spec) and "://" not in spec and not Path(spec).exists():
            matches = sorted(glob.glob(spec))
            if not matches:
                raise ConfigError(f"{spec!r} matches no file: check the pattern")
            sources.extend(matches)
        else:
            sources.append(spec)
    if len(sources) > 1:
        images = [source for source in sources if is_image_source(source)]
        if images:
            raise ConfigError(
                f"{images[0]} is an image or folder of images: label images with one run on "
                "their folder, videos with several sources"
            )
    return sources


def outputs_for(sources: list[str], output: OutputConfig) -> list[tuple[str, OutputConfig]]:
    """Each source with its own outputs: FOLDER/NAME.mp4, .jsonl and .csv in the folders given
    as --output, --json and --tracks (NAME: the file's name without suffix, or the source's
    text made safe for a file name).

    Raises:
        ConfigError: an output named like a file (it must be a folder with several sources),
            standard output for JSON, or two sources with the same name.
    """
    for what, suffix in SUFFIXES.items():
        folder = getattr(output, what)
        if folder == "-":
            raise ConfigError(f"--{_flag(what)} - writes one source's records: give a folder")
        if folder is not None and Path(folder).suffix.lower() == suffix:
            raise ConfigError(
                f"--{_flag(what)} {folder}: with several sources it is a folder, where each "
                f"writes NAME{suffix}"
            )
    names: dict[str, str] = {}
    planned = []
    for source in sources:
        name = _name(source)
        if name in names:
            raise ConfigError(
                f"{names[name]} and {source} would write the same outputs ({name}.*): "
                "run them separately"
            )
        names[name] = source
        own = dataclasses.replace(
            output,
            video=_in_folder(output.video, name, SUFFIXES["video"]),
            json=_in_folder(output.json, name, SUFFIXES["json"]),
            tracks=_in_folder(output.tracks, name, SUFFIXES["tracks"]),
        )
        planned.append((source, own))
    return planned


def _in_folder(folder: str | None, name: str, suffix: str) -> str | None:
    """FOLDER/NAME.SUFFIX (the folder made), or None when no folder was given."""
    if folder is None:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / f"{name}{suffix}")


def _flag(what: str) -> str:
    return {"video": "output", "json": "json", "tracks": "tracks"}[what]


def _name(source: str) -> str:
    path = Path(source)
    if path.is_file():
        return path.stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in source)
    return safe.strip("_") or "source"
