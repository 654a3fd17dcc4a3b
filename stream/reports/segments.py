"""A stream's segments in a cluster's output folder (`DIR/ID/`), one per incarnation of the
stream: which files are its JSON-lines segments, where each begins on the report's time axis,
and the spans between them when nobody was watched."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stream.outputs import UTC_STAMP, partial_path
from stream.visits import utc_seconds

log = logging.getLogger(__name__)

SUFFIX = ".jsonl"
PARTIAL_SUFFIX = partial_path(Path(f"x{SUFFIX}")).name[1:]  # ".partial.jsonl"
# ID-<stamp>-<node>: the stamp is the UTC second the incarnation started.
NAME = re.compile(r"(?P<stamp>\d{8}T\d{6}Z)-(?P<node>.+)")


@dataclass(frozen=True)
class SegmentFile:
    """One segment's JSON lines, and what its name says."""

    path: Path
    partial: bool  # still being written, or its node died
    stamp_s: float | None  # Unix seconds of the name's stamp; None when it has none
    node: str | None


def _segment_file(path: Path, prefix: str) -> SegmentFile | None:
    """The segment `path` names, or None when it is not one of the stream's segments."""
    name = path.name
    partial = name.endswith(PARTIAL_SUFFIX)
    stem = name.removesuffix(PARTIAL_SUFFIX if partial else SUFFIX)
    if stem == name or not stem.startswith(prefix) or not path.is_file():
        return None
    match = NAME.fullmatch(stem.removeprefix(prefix))
    if match is None:
        return SegmentFile(path, partial, None, None)
    try:
        stamp = datetime.strptime(match["stamp"], UTC_STAMP).replace(tzinfo=UTC)
    except ValueError:  # digits that are no date, e.g. month 13
        return SegmentFile(path, partial, None, None)
    return SegmentFile(path, partial, stamp.timestamp(), match["node"])


def find_segments(folder: Path) -> list[SegmentFile]:
    """The stream's segments in `folder`, in name order: files named after the folder (its
    stream id) that end in .jsonl or .partial.jsonl; a final file wins over a partial one of
    the same name.

    Raises:
        FileNotFoundError: one line naming the folder and what it should hold.
    """
    prefix = f"{folder.resolve().name}-"  # "." names no stream
    found: dict[str, SegmentFile] = {}
    for path in sorted(folder.iterdir()):
        segment = _segment_file(path, prefix)
        if segment is None:
            continue
        key = path.name.removesuffix(PARTIAL_SUFFIX if segment.partial else SUFFIX)
        if key not in found or found[key].partial:
            found[key] = segment
    if not found:
        raise FileNotFoundError(
            f"no segments in {folder}: expected {prefix}<YYYYmmddTHHMMSSZ>-<node>{SUFFIX} (or "
            f"{PARTIAL_SUFFIX}) files, as serve --cluster --output-dir writes, or pass a run's "
            "--json file"
        )
    return [found[key] for key in sorted(found)]


def segment_start_s(segment: SegmentFile, start: dict) -> float | None:
    """Unix seconds when the segment began: its start record's "started", else its name's
    stamp; None when neither says."""
    started = start.get("started")
    if isinstance(started, str):
        try:
            return utc_seconds(started)
        except ValueError:
            log.warning(
                '%s: "started" %r is not an ISO 8601 time; using the file name\'s time',
                segment.path, started[:40],
            )  # fmt: skip
    return segment.stamp_s


def segment_node(segment: SegmentFile, start: dict) -> str | None:
    """The node that wrote the segment: its start record's "node", else its name's."""
    node = start.get("node")
    return node if isinstance(node, str) and node else segment.node


def offsets(starts: Sequence[float | None], ends: Sequence[float]) -> list[float]:
    """Where each segment's time 0 lies on the report's axis (seconds since the first one
    began). `starts`: Unix seconds (None: not known); `ends`: each segment's last time in its
    own seconds, the segments in name order. Without every start, the segments are placed one
    after the other in name order, with no time between them."""
    known = [start for start in starts if start is not None]
    if len(known) == len(starts):
        first = min(known)
        return [start - first for start in known]
    log.warning(
        "%d of %d segments say no start time: placed one after the other in file-name order",
        len(starts) - len(known), len(starts),
    )  # fmt: skip
    placed, at = [], 0.0
    for end in ends:
        placed.append(at)
        at += max(end, 0.0)
    return placed


def gaps(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The times between `spans` (from, to) that none of them covers: nobody was watched."""
    found: list[tuple[float, float]] = []
    ordered = sorted(spans)
    reach = ordered[0][1] if ordered else 0.0
    for begin, end in ordered[1:]:
        if begin > reach:
            found.append((reach, begin))
        reach = max(reach, end)
    return found
