"""`agestream counts`: how many people of each age group and gender each camera saw per hour
or day, read from a visits store, as a table, CSV or JSON."""

from __future__ import annotations

import argparse
import io
import itertools
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from stream.outputs import OutputError, write_report, write_whole
from stream.types import PERSON_AGE_GROUPS, SHOWN_GENDERS, UNKNOWN, CountRow
from stream.visits import StoreError, counts_csv, counts_json, open_store, redacted, utc_seconds

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command cut off by `| head`
DEFAULT_SPAN_S = 24 * 3600
AGO_UNITS_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
AGO = re.compile(r"(\d+(?:\.\d+)?)([mhdw])")
WHEN_HELP = "an ISO date or time (2026-12-03, 2026-12-03T14:00; UTC unless it names a zone) or "
WHEN_HELP += "a time ago (90m, 24h, 7d, 2w)"
TABLE_COLUMNS = ("total", *PERSON_AGE_GROUPS, UNKNOWN, *SHOWN_GENDERS, UNKNOWN)


def parse_when(text: str, now: float | None = None) -> float:
    """Unix seconds of a --from/--to value: an ISO date or time (UTC unless it names a zone),
    `now`, or a time ago such as 24h or 7d; argparse.ArgumentTypeError otherwise."""
    now = time.time() if now is None else now
    spoken = text.strip().lower()
    if spoken == "now":
        return now
    ago = AGO.fullmatch(spoken)
    if ago:
        return now - float(ago.group(1)) * AGO_UNITS_S[ago.group(2)]
    try:
        return utc_seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {WHEN_HELP}, got {text!r}") from None


def add_counts_parser(commands: argparse._SubParsersAction) -> None:
    """The `counts` command's parser."""
    counts = commands.add_parser(
        "counts",
        help="people per camera and hour or day, by age group and gender, from a visits store",
    )
    counts.add_argument(
        "store", metavar="DB", help="the visits store: an SQLite file or a postgresql:// URL"
    )
    counts.add_argument(
        "--from",
        dest="start",
        metavar="WHEN",
        type=parse_when,
        help=f"count people first seen from then: {WHEN_HELP} (default: 24 h before --to)",
    )
    counts.add_argument(
        "--to",
        dest="end",
        metavar="WHEN",
        type=parse_when,
        help="... until then, as for --from (default: now)",
    )
    counts.add_argument("--camera", metavar="NAME", help="only this camera (default: all)")
    counts.add_argument(
        "--by", choices=("hour", "day"), default="hour", help="UTC period (default: hour)"
    )
    counts.add_argument("--csv", metavar="FILE", help="write CSV here (- for stdout)")
    counts.add_argument("--json", metavar="FILE", help="write JSON here (- for stdout)")


def cmd_counts(args: argparse.Namespace) -> int:
    """Run `agestream counts`; the exit status: 0, 1 (an output cannot be written), 2 (bad
    arguments, or a store that cannot be read), 141 (stdout closed early)."""
    end = time.time() if args.end is None else args.end
    start = end - DEFAULT_SPAN_S if args.start is None else args.start
    if start >= end:
        return _fail(f"--from ({_moment(start)}) must be before --to ({_moment(end)})", EXIT_USAGE)
    if args.csv == "-" and args.json == "-":
        return _fail("--csv - and --json - cannot both go to stdout: give one a file", EXIT_USAGE)
    if "://" not in args.store and not Path(args.store).exists():
        return _fail(
            f"no visits store at {args.store}: check the path (agestream serve makes it)",
            EXIT_USAGE,
        )
    try:
        with open_store(args.store, create=False) as store:
            rows = store.counts(start, end, args.camera, args.by)
            cameras = [] if rows else store.cameras()
    except StoreError as error:
        return _fail(str(error), EXIT_USAGE)
    try:
        _write_outputs(args, rows, cameras, start, end)
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OutputError as error:
        return _fail(str(error), EXIT_ERROR)
    return 0


def _write_outputs(
    args: argparse.Namespace, rows: list[CountRow], cameras: list[str], start: float, end: float
) -> None:
    if args.csv is None and args.json is None:
        print(_heading(args.store, args.camera, args.by, start, end))
        print(format_counts_table(rows, args.by) if rows else _nobody(args.camera, cameras))
        sys.stdout.flush()
        return
    if args.csv is not None:
        text = io.StringIO()
        counts_csv(rows, text)
        _write_csv(text.getvalue(), args.csv)
    if args.json is not None:
        write_report(counts_json(rows), args.json)
    for target in (args.csv, args.json):
        if target not in (None, "-"):
            print(f"agestream counts: wrote {len(rows)} rows to {target}", file=sys.stderr)


def _write_csv(text: str, target: str) -> None:
    """`text` to stdout ("-"), or to a file through a partial file renamed when whole."""
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_whole(Path(target), text.encode("utf-8"), "counts CSV")


def format_counts_table(rows: Sequence[CountRow], by: str) -> str:
    """One line per camera and period: the total, then people per age group, then per gender;
    a total line per camera when it has more than one period."""
    periods: dict[tuple[str, float], Counter[str]] = {}
    for row in rows:
        tally = periods.setdefault((row.camera, row.start), Counter())
        tally["total"] += row.people
        tally[f"age {row.age_group}"] += row.people
        tally[f"gender {row.gender}"] += row.people
    keys = ["total", *(f"age {group}" for group in (*PERSON_AGE_GROUPS, UNKNOWN))]
    keys += [f"gender {gender}" for gender in (*SHOWN_GENDERS, UNKNOWN)]
    lines = [(camera, _period_name(start, by), tally) for (camera, start), tally in periods.items()]
    table = [["camera", f"{by} (UTC)", *TABLE_COLUMNS]]
    table += [
        [camera, name, *(str(tally[key]) for key in keys)]
        for camera, name, tally in _with_camera_totals(lines)
    ]
    widths = [max(len(cells[column]) for cells in table) for column in range(len(table[0]))]
    ages = slice(3, 4 + len(PERSON_AGE_GROUPS))
    lead = sum(widths[:3]) + 2
    age_width = sum(widths[ages]) + len(PERSON_AGE_GROUPS)
    text = [f"{'':<{lead}} | {'age':<{age_width}} | gender"]
    for cells in table:
        padded = [f"{cell:<{width}}" for cell, width in zip(cells[:2], widths[:2], strict=True)]
        padded += [f"{cell:>{width}}" for cell, width in zip(cells[2:], widths[2:], strict=True)]
        text.append(
            f"{' '.join(padded[:3])} | {' '.join(padded[ages])} | {' '.join(padded[ages.stop :])}"
        )
    return "\n".join(text)


def _with_camera_totals(
    lines: list[tuple[str, str, Counter[str]]],
) -> list[tuple[str, str, Counter[str]]]:
    """`lines` (grouped by camera) with a total line after each camera of several periods."""
    out: list[tuple[str, str, Counter[str]]] = []
    for camera, group in itertools.groupby(lines, key=lambda line: line[0]):
        own = list(group)
        out += own
        if len(own) > 1:
            out.append((camera, "all", sum((tally for _, _, tally in own), Counter())))
    return out


def _period_name(start: float, by: str) -> str:
    return datetime.fromtimestamp(start, UTC).strftime(
        "%Y-%m-%d %H:%M" if by == "hour" else "%Y-%m-%d"
    )


def _moment(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _heading(store: str, camera: str | None, by: str, start: float, end: float) -> str:
    which = f"camera {camera}" if camera else "all cameras"
    return (
        f"people first seen from {_moment(start)} to {_moment(end)}, {which}, by {by} "
        f"({redacted(store)})"
    )


def _nobody(camera: str | None, cameras: list[str]) -> str:
    known = ", ".join(cameras) if cameras else "none yet"
    who = f"camera {camera}" if camera else "any camera"
    return f"nobody was first seen by {who} in that time (cameras in the store: {known})"


def _fail(message: str, status: int) -> int:
    print(f"agestream counts: {message}", file=sys.stderr)
    return status


def _quiet_broken_pipe() -> int:
    """The reader of stdout left (`| head`): end quietly. stdout goes to /dev/null so that
    Python's flush at exit does not fail on the closed pipe once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE
