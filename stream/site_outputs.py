"""What `agestream serve` keeps and sends beyond the live page: where its visits store is,
its event publishers (MQTT, webhooks), and the hourly counts it announces through them."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from estimators.base import first_line
from stream.config import ConfigError, EventsConfig, ServeConfig
from stream.events_out import MqttPublisher, Publisher, WebhookPublisher, hourly_counts
from stream.people_sinks import EventPublisher
from stream.visits import VisitStore

log = logging.getLogger(__name__)

STORE_NAME = "visits.db"
HOUR_S = 3600
# The current hour's counts are announced this often.
COUNTS_EVERY_S = 60.0


def _hour_of(unix_s: float) -> float:
    return (unix_s // HOUR_S) * HOUR_S


def store_target(settings: ServeConfig) -> str:
    """`serve.database`; else visits.db in `serve.output_dir`; else in $XDG_DATA_HOME/agestream
    (~/.local/share/agestream)."""
    if settings.database is not None:
        return settings.database
    if settings.output_dir is not None:
        return str(Path(settings.output_dir) / STORE_NAME)
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return str(Path(data_home) / "agestream" / STORE_NAME)


def video_dir(settings: ServeConfig) -> str | None:
    """Where the streams write annotated video: `output_dir` with `store: video`, else nowhere.

    Raises:
        ConfigError: `store: video` without an output_dir.
    """
    if settings.store != "video":
        return None
    if settings.output_dir is None:
        raise ConfigError(
            "serve.store video writes each stream's video into serve.output_dir: "
            "give --output-dir DIR"
        )
    return settings.output_dir


def open_publishers(events: EventsConfig, stack: ExitStack) -> list[Publisher]:
    """A publisher per receiver of `events`, each closed with `stack` (waiting up to 5 s to
    deliver what is queued).

    Raises:
        ConfigError: a malformed URL or prefix.
    """
    publishers: list[Publisher] = []
    try:
        if events.mqtt is not None:
            mqtt = MqttPublisher(events.mqtt, events.mqtt_prefix, queue_size=events.queue_size)
            publishers.append(stack.enter_context(mqtt))
        for url in events.webhooks:
            hook = WebhookPublisher(url, queue_size=events.queue_size)
            publishers.append(stack.enter_context(hook))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return publishers


class HourlyCounts(threading.Thread):
    """Announces each camera's counts of the current hour every COUNTS_EVERY_S, and of the hour
    just ended once more after it ends (from the store, so a restart within the hour loses
    nothing), to every publisher; ends when `stop` is set."""

    def __init__(
        self,
        store: VisitStore,
        publishers: Sequence[EventPublisher],
        cameras: Callable[[], list[str]],
        stop: threading.Event,
    ) -> None:
        super().__init__(name="hourly-counts", daemon=True)
        self._store, self._publishers, self._cameras = store, publishers, cameras
        self._stopping = stop  # not _stop: threading.Thread has a _stop() of its own

    def run(self) -> None:
        hour = _hour_of(time.time())
        self.announce(hour)
        while not self._stopping.wait(COUNTS_EVERY_S):
            now = _hour_of(time.time())
            if now != hour:
                # Every visit first seen in it was saved by now (SAVE_EVERY_S): its final counts.
                self.announce(hour)
                hour = now
            self.announce(hour)

    def announce(self, hour: float) -> None:
        """Every camera's counts of the hour starting at `hour` (unix s), zeros included."""
        try:
            rows = self._store.counts(hour, hour + HOUR_S)
            cameras = self._cameras()
        except Exception as error:  # noqa: BLE001 - the next hour tries again
            log.warning("cannot read the hour's counts: %s", first_line(error))
            return
        for camera in cameras:
            event = hourly_counts(
                camera, [row for row in rows if row.camera == camera], hour_start=hour
            )
            for publisher in self._publishers:
                publisher.publish(event)
