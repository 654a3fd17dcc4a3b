"""Output files that cannot destroy data: checked against the input and each other, written
under a lock to a partial file beside the final one, and renamed into place only when whole."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL = "partial"
# A UTC second in names: outputs' (door-20261203T170102Z.mp4), segments', incarnations'.
UTC_STAMP = "%Y%m%dT%H%M%SZ"


class OutputError(RuntimeError):
    """An output cannot be written; the message names the file, the reason and what to do."""


def _identity(path: Path) -> tuple[str, object]:
    """What makes two paths the same file: its inode when it exists (hard links, symlinks),
    else its fully resolved path."""
    try:
        stat = path.stat()
        return ("inode", (stat.st_dev, stat.st_ino))
    except OSError:
        return ("path", str(path.expanduser().resolve()))


def partial_path(final: Path) -> Path:
    """Where `final` is written until it is whole: `out.mp4` -> `out.partial.mp4`."""
    return final.with_name(f"{final.stem}.{PARTIAL}{final.suffix}")


def check_output_paths(outputs: Mapping[str, Path], source: Path | None) -> None:
    """Refuse any output that is the input, or the same file as another output (or its
    partial file), however the paths spell it.

    Raises:
        OutputError: one line naming both.
    """
    seen: dict[tuple[str, object], str] = {}
    if source is not None:
        seen[_identity(source)] = f"the input {source}"
    for what, path in outputs.items():
        for candidate in (path, partial_path(path)):
            identity = _identity(candidate)
            if identity in seen:
                raise OutputError(
                    f"{what} {path} is the same file as {seen[identity]}; "
                    "choose another name so nothing is overwritten"
                )
        seen[_identity(path)] = f"the {what} {path}"
        seen[_identity(partial_path(path))] = f"the {what} {path}"


def failure(what: str, path: Path, error: OSError) -> OutputError:
    """One line for a failed write, naming the file and the errno."""
    reason = error.strerror or str(error)
    code = errno.errorcode.get(error.errno or 0, str(error.errno))
    return OutputError(f"cannot write {what} {path}: {reason} ({code})")


class PartialFile:
    """An output being written: `NAME.partial.EXT`, locked against a second run, renamed to
    `NAME.EXT` by `commit`. A run that fails or is killed leaves the partial file, whose
    contents so far stay readable.

    Args:
        final: the output's path.
        what: what it is, for messages ("video", "JSON lines file").
    """

    def __init__(self, final: Path, what: str) -> None:
        self.final, self.what = final, what
        self.path = partial_path(final)
        if not final.parent.is_dir():
            raise OutputError(f"cannot write {what} {final}: folder {final.parent} does not exist")
        try:
            # No O_TRUNC: a partial file another run is writing must survive our failed lock.
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise failure(what, final, error) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise OutputError(
                f"{what} {final} is being written by another agestream run (it holds "
                f"{self.path}); wait for it or choose another name"
            ) from None
        if os.fstat(descriptor).st_size:
            log.warning("replacing %s, left by a run that did not finish", self.path)
        os.ftruncate(descriptor, 0)
        self.descriptor = descriptor
        self.whole_bytes = 0  # bytes up to the end of the last whole record
        self.written = 0
        self.broken = False
        self.failure: str | None = None

    def write(self, data: bytes) -> int:
        """Write all of `data`. On a failure the file is cut back to its last whole record
        (see `mark`), later writes are refused, and an OutputError names the file and errno."""
        if self.broken:
            raise OutputError(f"{self.what} {self.final} already failed; nothing more is written")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.descriptor, view) :]
        except OSError as error:
            self._break(error)
            try:
                os.ftruncate(self.descriptor, self.whole_bytes)
            except OSError:
                pass  # the file keeps a torn tail; its partial name already says so
            raise OutputError(self.failure) from None
        self.written += len(data)
        return len(data)

    def mark(self) -> None:
        """Everything written so far is whole records (lines, video fragments)."""
        self.whole_bytes = self.written

    def sync(self) -> None:
        """Push what was written to the disk, so that power loss keeps it."""
        try:
            os.fsync(self.descriptor)
        except OSError as error:
            self._break(error)
            raise OutputError(self.failure) from None

    def _break(self, error: OSError) -> None:
        self.broken = True
        self.written = self.whole_bytes
        self.failure = str(failure(self.what, self.final, error))

    def commit(self) -> None:
        """Make the file whole under its final name; the lock goes with the close."""
        try:
            self.sync()
            os.replace(self.path, self.final)
        except OSError as error:
            self._break(error)
            raise OutputError(self.failure) from None
        finally:
            os.close(self.descriptor)

    def abandon(self) -> None:
        """Close without renaming: what was written stays in the partial file."""
        os.close(self.descriptor)


def strict_json(value: object) -> object:
    """`value` with every non-finite float (NaN: nothing scored) as None, so it dumps as
    valid JSON (null) rather than as bare NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def json_number(value: float | None, digits: int) -> float | None:
    """`value` rounded to `digits`; None (JSON null) when it is not known: None, NaN or an
    infinity."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def write_whole(path: Path, data: bytes, what: str) -> None:
    """`data` to `path` through its partial file, renamed into place only when whole; after a
    failed write what was written stays in the partial file (`what` names it in errors)."""
    output = PartialFile(path, what)
    try:
        output.write(data)
    except BaseException:
        output.abandon()
        raise
    output.commit()


def write_report(report: object, target: str) -> None:
    """A JSON report to `target` ("-": stdout), strict JSON, the file replaced only when
    whole."""
    text = json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_whole(Path(target), text.encode("utf-8"), "report")
