"""`agestream serve`: several sources in one process behind one batched estimator (or spread
over a Ray cluster's nodes with `--cluster`), with the live page and JSON API, until Ctrl-C or
SIGTERM; every stream's outputs are finalized then."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from contextlib import ExitStack
from dataclasses import dataclass

from estimators import create_estimator
from stream.batcher import EstimateBatcher
from stream.cluster import ClusterHub, import_ray
from stream.config import Config, ConfigError, StreamEntry
from stream.hub import StreamHub
from stream.site_outputs import HourlyCounts, open_publishers, store_target, video_dir
from stream.stages import ignore_interrupts_while_finishing
from stream.visits import open_store, redacted
from stream.web import check_exposure, serve_forever

log = logging.getLogger(__name__)

TOKEN_VARIABLE = "AGESTREAM_TOKEN"


@dataclass(frozen=True)
class ServeOptions:
    """What the command line adds to the config's `serve` section."""

    sources: tuple[str, ...]
    token: str | None


def access_token(given: str | None) -> str | None:
    """--token, else AGESTREAM_TOKEN; an empty value is no token."""
    token = given if given is not None else os.environ.get(TOKEN_VARIABLE)
    return token or None


def starting_streams(config: Config, sources: tuple[str, ...]) -> list[StreamEntry]:
    """The config's streams, then the command line's sources."""
    return [*config.serve.streams, *(StreamEntry(source=source) for source in sources)]


def serve(config: Config, options: ServeOptions, stop: threading.Event) -> list[str]:
    """Serve until `stop` is set or Ctrl-C/SIGTERM (KeyboardInterrupt: how a server is meant
    to stop); returns each stream's summary once every output is finalized. Refuses
    (ConfigError) to expose the server beyond this machine without a token, before anything
    loads.

    Every stream's people are kept as visits in the store (`store_target`); with `store:
    video` each stream also writes its annotated video, JSON lines and tracks CSV.
    """
    settings = config.serve
    check_exposure(settings.host, options.token)
    if settings.cluster is not None:
        import_ray()  # before anything loads: one line naming the extra
    elif settings.estimator_service:
        raise ConfigError("estimator_service (--estimator-service) needs a cluster (--cluster)")
    output_dir = video_dir(settings)
    entries = starting_streams(config, options.sources)
    if not entries:
        log.warning("no source given: add streams on the page or with POST /api/streams")
    with ExitStack() as stack:
        target = store_target(settings)
        store = stack.enter_context(open_store(target))
        kept = f"annotated video in {output_dir}" if output_dir else "no image or video"
        log.info("keeping visits and counts in %s; %s", redacted(target), kept)
        publishers = open_publishers(config.events, stack)
        hub: StreamHub | ClusterHub
        if settings.cluster is not None:
            hub = ClusterHub(cluster_config(config, target), settings.cluster, store, publishers)
        else:
            estimator = create_estimator(config.estimator, config.models_dir)
            batcher = stack.enter_context(
                EstimateBatcher(estimator, settings.max_batch, settings.max_wait_ms)
            )
            hub = StreamHub(
                config, batcher, output_dir, settings.loop, store=store, publishers=publishers
            )
        return _run_hub(hub, entries, config, options, stop)


def cluster_config(config: Config, store: str) -> Config:
    """The config the nodes get: the output folder and the visits store the head resolved,
    as absolute paths (a node does not share the head's working folder or home)."""
    settings = config.serve
    output_dir = settings.output_dir
    if output_dir is not None:
        output_dir = os.path.abspath(os.path.expanduser(output_dir))
    if "://" not in store:
        store = os.path.abspath(os.path.expanduser(store))
    serve = dataclasses.replace(settings, output_dir=output_dir, database=store)
    return dataclasses.replace(config, serve=serve)


def _run_hub(
    hub: StreamHub | ClusterHub,
    entries: list[StreamEntry],
    config: Config,
    options: ServeOptions,
    stop: threading.Event,
) -> list[str]:
    """Start the streams and the web server; close the hub however serving ends."""
    settings = config.serve
    announcer_stop = threading.Event()
    try:  # a signal while the streams start still finalizes those started
        for entry in entries:
            hub.add(str(entry.source), entry.id, entry)
        if hub.publishers and hub.store is not None:
            # After the adds: the first counts name every camera.
            HourlyCounts(hub.store, hub.publishers, hub.cameras, announcer_stop).start()
        serve_forever(
            hub, settings.host, settings.port, options.token, stop,
            allowed_hosts=settings.allowed_hosts,
        )  # fmt: skip
    except KeyboardInterrupt:
        log.info("stopping: finalizing every stream's outputs")
    finally:
        ignore_interrupts_while_finishing()
        announcer_stop.set()
        summaries = hub.close()
    return summaries
