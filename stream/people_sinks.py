"""People's visits from a stream's frames (`Presence`), and the sinks that keep them in the
visits store (`VisitsSink`) and send them out as person_entered / person_left events
(`EventsSink`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from estimators.base import first_line
from stream.connections import RateLimiter
from stream.drain import BaseSink
from stream.events_out import MqttPublisher, person_entered, person_left
from stream.records import people_in_view
from stream.types import AnnotatedFrame, StreamStart, TrackStatus, Visit

log = logging.getLogger(__name__)

# An open visit (a person still in view) is saved this often, so that a crash or power loss
# loses at most this much of it.
SAVE_EVERY_S = 2.0
# A store that keeps failing is named in the log at most this often.
SAVE_WARN_EVERY_S = 60.0


def wall_time(monotonic: float) -> float:
    """time.time() at an earlier time.monotonic() reading."""
    return time.time() - (time.monotonic() - monotonic)


class Presence:
    """The visits of one stream's people: opened when a person's track is confirmed, updated
    with their label each frame, closed when they leave (stream.types.Visit)."""

    def __init__(self, stream: StreamStart) -> None:
        self._stream = stream
        self._open: dict[int, Visit] = {}
        self._since_ms: dict[int, float] = {}

    def update(self, frame: AnnotatedFrame) -> tuple[list[Visit], list[Visit]]:
        """The visits this frame changed, and among them those that got their first age
        estimate (the person_entered moment)."""
        result = frame.result
        now = wall_time(result.frame.timestamp)
        changed, labelled = [], []
        for track in people_in_view(frame, self._since_ms):
            earlier = self._open.get(track.track)
            visit = self._visit(track, now, earlier)
            self._open[track.track] = visit
            changed.append(visit)
            if visit.age is not None and (earlier is None or earlier.age is None):
                labelled.append(visit)
        return changed, labelled

    def _visit(self, track: TrackStatus, now: float, earlier: Visit | None) -> Visit:
        return Visit(
            camera=self._stream.camera,
            run=self._stream.run,
            person=track.track,
            first_seen=earlier.first_seen if earlier is not None else now,
            last_seen=now,
            age=track.age,
            age_low=track.age_low,
            age_high=track.age_high,
            gender=track.gender,
            confidence=track.confidence,
            ended=False,
        )

    def leave(self, people: Sequence[int]) -> list[Visit]:
        """The ended visits of `people` (those never confirmed had none)."""
        return [
            dataclasses.replace(self._open.pop(person), ended=True)
            for person in people
            if person in self._open
        ]

    def leave_all(self) -> list[Visit]:
        return self.leave(list(self._open))


class VisitSaver(Protocol):
    def save(self, visits: Sequence[Visit]) -> None: ...


class VisitsSink(BaseSink):
    """Keeps a stream's visits in the visits store: ended ones when the person leaves, open
    ones every SAVE_EVERY_S, every one still open as ended when the stream stops. A store
    that fails to write is logged, never stops the stream; the visits are saved again later."""

    def __init__(self, store: VisitSaver) -> None:
        self._store = store
        self._presence: Presence | None = None
        self._dirty: dict[int, Visit] = {}
        self._saved_at = time.monotonic()
        self._warnings = RateLimiter(SAVE_WARN_EVERY_S)

    def start(self, stream: StreamStart) -> None:
        self._presence = Presence(stream)

    def frame(self, frame: AnnotatedFrame) -> None:
        assert self._presence is not None, "start() first"
        changed, _ = self._presence.update(frame)
        self._dirty.update((visit.person, visit) for visit in changed)
        if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
            self._save()

    def people_left(self, people: tuple[int, ...], t_ms: float) -> None:
        assert self._presence is not None, "start() first"
        self._dirty.update((visit.person, visit) for visit in self._presence.leave(people))
        self._save()

    def _save(self) -> None:
        self._saved_at = time.monotonic()
        if not self._dirty:
            return
        try:
            self._store.save(list(self._dirty.values()))
        except Exception as error:  # noqa: BLE001 - the cameras go on; saved again next time
            self._warnings.log("cannot save visits (retrying): ", first_line(error))
            return
        self._dirty.clear()

    def close(self) -> None:
        if self._presence is not None:
            self._dirty.update((visit.person, visit) for visit in self._presence.leave_all())
        self._save()


class EventPublisher(Protocol):
    def publish(self, event: dict) -> None: ...


class EventsSink(BaseSink):
    """Sends person_entered when a person first has an age estimate (or, for one who never
    had, just before they leave) and person_left when they leave, to every publisher; a
    publisher never blocks (stream.events_out queues and retries).

    At start it sends person_left for `earlier`, the visits an earlier incarnation of the
    camera left open (it was killed), and, with `announce`, the camera's Home Assistant
    discovery configs to MQTT publishers.
    """

    def __init__(
        self,
        publishers: Sequence[EventPublisher],
        earlier: Sequence[Visit] = (),
        announce: bool = False,
    ) -> None:
        self._publishers = publishers
        self._earlier = earlier
        self._announce = announce
        self._presence: Presence | None = None
        self._entered: set[int] = set()

    def start(self, stream: StreamStart) -> None:
        self._presence = Presence(stream)
        for publisher in self._publishers:
            if self._announce and isinstance(publisher, MqttPublisher):
                publisher.announce([stream.camera])
        for visit in self._earlier:  # their person_entered went out before the kill
            self._send(person_left(visit))

    def frame(self, frame: AnnotatedFrame) -> None:
        assert self._presence is not None, "start() first"
        _, labelled = self._presence.update(frame)
        for visit in labelled:
            self._enter(visit)

    def _enter(self, visit: Visit) -> None:
        self._entered.add(visit.person)
        self._send(person_entered(visit))

    def people_left(self, people: tuple[int, ...], t_ms: float) -> None:
        assert self._presence is not None, "start() first"
        self._leave(self._presence.leave(people))

    def _leave(self, visits: list[Visit]) -> None:
        for visit in visits:
            if visit.person not in self._entered:
                self._enter(visit)
            self._entered.discard(visit.person)
            self._send(person_left(visit))

    def _send(self, event: dict) -> None:
        for publisher in self._publishers:
            publisher.publish(event)

    def close(self) -> None:
        if self._presence is not None:
            self._leave(self._presence.leave_all())
