"""`serve --cluster`: the head's `ClusterHub`, which spreads streams over a Ray cluster's
worker nodes (one `NodeAgent` actor each), places them by labels on the least-loaded node,
and restarts the streams of a node that dies on another.

The head runs the page, the API and /metrics as a single-process serve does (ClusterHub has
StreamHub's methods); a supervisor thread polls every node's statuses and metrics twice a
second and watches Ray's node table, where a dead node shows within the health checks'
settings (`agestream cluster head`: about 2 s). Every call to a node has a timeout.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from estimators.base import first_line, root_error
from stream.cluster_command import ClusterError, check_answers, own_labels
from stream.config import Config, ConfigError, StreamEntry
from stream.connections import RateLimiter
from stream.hub import SCHEME, STOP_TIMEOUT_S, StoreCounts, new_stream_id
from stream.people_sinks import EventPublisher
from stream.types import StreamStatus
from stream.visits import VisitStore

log = logging.getLogger(__name__)

SUPERVISE_EVERY_S = 0.5
CALL_TIMEOUT_S = 10.0  # add: the node opens the source and reads its first frame
JPEG_TIMEOUT_S = 2.0
AGENT_START_TIMEOUT_S = 180.0  # the node loads its models
CLOSE_TIMEOUT_S = 120.0  # every node finalizes its segments
SERVICE_WAIT_MS = 1.0  # the estimator service's batch wait
SPREAD_WAIT_S = 60.0  # a new camera waits this long for the nodes still loading
NAMESPACE = "agestream"
HEAD_RESOURCE = "node:__internal_head__"
EXTRA_HINT = "pip install 'agestream[cluster]'"
# States of a stream that has nothing left to move.
OVER = ("ended", "failed")


def import_ray() -> Any:
    """Ray, or ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--cluster needs Ray: {EXTRA_HINT}") from None
    return ray


@dataclass
class _Agent:
    """The head's handle on one node's NodeAgent."""

    node_id: str
    name: str
    labels: dict[str, str]
    handle: Any
    started: float
    ready: bool = False
    pending: Any = None  # the ref of the call in flight: ready(), then snapshot()
    streams: list[StreamStatus] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


@dataclass
class _Placed:
    """One stream as the head knows it: where it runs (node id, None while it waits for one)
    and, once it moved, the node it ran on before."""

    id: str
    entry: StreamEntry
    node: str | None = None
    moved_from: str | None = None
    lost_at: float | None = None  # time.monotonic() when its node's death was noticed
    failed: str | None = None


def node_name(node: dict) -> str:
    """A node's short name: its address and the start of its id (several nodes can share
    one machine's address)."""
    return f"{node['NodeManagerAddress']}-{node['NodeID'][:6]}"


def labels_match(wanted: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _names_a_file(source: str) -> bool:
    """Whether a source argument is a file path (not a URL or a webcam index)."""
    return not (SCHEME.match(source) or source.isdigit())


def absolute_source(source: str) -> str:
    """A relative file path as an absolute one (nodes do not share the head's working
    folder); URLs and webcam indexes as given."""
    return os.path.abspath(os.path.expanduser(source)) if _names_a_file(source) else source


@contextmanager
def _signals_kept() -> Iterator[None]:
    """ray.init replaces the SIGTERM handler with its own (sys.exit); keep serve's, which
    finalizes every output first."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)


class ClusterHub(StoreCounts):
    """StreamHub's methods (what the page and the API use) over the worker nodes of the Ray
    cluster at `address`: each node serves its streams in a NodeAgent; the head keeps which
    stream runs where, places new and orphaned streams, and reads the statuses.

    Args:
        config: the serve config (output_dir and database as absolute paths: the nodes do not
            share the head's working folder).
        address: the head's HOST:PORT.
        store: the visits store the head reads counts from (the nodes write into the same
            target), or None.
        publishers: the head's events out (hourly counts; the nodes send their own people's).
    """

    def __init__(
        self,
        config: Config,
        address: str,
        store: VisitStore | None = None,
        publishers: Sequence[EventPublisher] = (),
    ) -> None:
        self._ray = import_ray()
        self.config, self.store, self.publishers = config, store, tuple(publishers)
        try:
            check_answers(address)
        except ClusterError as error:
            raise ConfigError(f"--cluster {address}: {error}") from None
        with _signals_kept():
            try:
                self._ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as error:
                raise ConfigError(
                    f"--cluster {address}: cannot join the Ray cluster ({first_line(error)}); "
                    "start its head with `agestream cluster head`"
                ) from None
        if config.serve.estimator_service:
            from stream.estimator_service import deploy_estimator_service

            settings = config.serve
            deploy_estimator_service(
                config.estimator, config.models_dir,
                # A node's batch alone may fill serve.max_batch: room for several to merge.
                # The nodes have batched already: batches that arrive while the model runs
                # merge anyway, waiting longer for more only adds to every frame's latency.
                max_batch=4 * settings.max_batch, max_wait_ms=SERVICE_WAIT_MS,
                num_gpus=settings.estimator_service_gpus,
            )  # fmt: skip
        from stream.cluster_node import NodeAgent

        self._agent_class = self._ray.remote(NodeAgent)
        self._agents: dict[str, _Agent] = {}
        self._placed: dict[str, _Placed] = {}
        self._retry_at: dict[str, float] = {}  # nodes whose agent failed to start
        self._lock = threading.Lock()
        self._cameras = itertools.count(1)  # numbers of the default ids cam1, cam2, ...
        self._closed = False
        self.reassignments = 0
        self._stop = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="cluster", daemon=True)
        self._supervisor.start()

    # The supervisor: node table, agents' answers, placement.

    def _supervise(self) -> None:
        trouble = RateLimiter()  # a head whose Ray went away would fail every tick
        while not self._stop.wait(SUPERVISE_EVERY_S / 2):
            try:
                self._tick()
            except Exception as error:  # noqa: BLE001 - the next tick tries again
                trouble.log("cluster: ", first_line(error))

    def _tick(self) -> None:
        alive = {
            node["NodeID"]: node
            for node in self._ray.nodes()
            if node["Alive"] and HEAD_RESOURCE not in node["Resources"]
        }
        for agent in list(self._agents.values()):
            if agent.node_id not in alive:
                self._lost(agent, "the node left the cluster")
        now = time.monotonic()
        for node_id, node in alive.items():
            if node_id not in self._agents and self._retry_at.get(node_id, 0.0) <= now:
                self._start_agent(node)
        self._poll()
        self._place_waiting()

    def _start_agent(self, node: dict) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = node_name(node)
        labels = own_labels(node)
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        # No CPU reserved: the node's CPUs are for its streams' own threads.
        handle = self._agent_class.options(
            num_cpus=0, max_concurrency=32, scheduling_strategy=strategy
        ).remote(self.config, name, self.config.serve.estimator_service)
        agent = _Agent(node["NodeID"], name, labels, handle, time.monotonic())
        agent.pending = handle.ready.remote()
        with self._lock:
            self._agents[agent.node_id] = agent
        log.info("node %s joined (labels %s): loading its models", name, labels or "none")

    def _poll(self) -> None:
        """Collect the answers that arrived (readiness, snapshots) and ask again."""
        ray = self._ray
        pending = {a.pending: a for a in list(self._agents.values()) if a.pending is not None}
        done = []
        if pending:
            wait_s = SUPERVISE_EVERY_S / 2
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
        for ref in done:
            agent = pending[ref]
            agent.pending = None
            try:
                answer = ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as error:
                self._lost(agent, first_line(root_error(error)), retry=not agent.ready)
                continue
            except Exception as error:  # noqa: BLE001 - the next poll asks again
                log.warning("node %s: %s", agent.name, first_line(root_error(error)))
                continue
            if not agent.ready:
                agent.ready = True
                log.info("node %s ready", agent.name)
            else:
                agent.streams, agent.metrics = answer
        for agent in list(self._agents.values()):
            if not agent.ready and time.monotonic() - agent.started > AGENT_START_TIMEOUT_S:
                self._lost(agent, f"not ready after {AGENT_START_TIMEOUT_S:.0f} s", retry=True)
            elif agent.ready and agent.pending is None:
                agent.pending = agent.handle.snapshot.remote()

    def _lost(self, agent: _Agent, why: str, retry: bool = False) -> None:
        """Forget a node's agent; its streams wait for another node (`_place_waiting`).
        `retry`: the agent failed to start, its node gets another in 30 s."""
        now = time.monotonic()
        with self._lock:
            if self._agents.pop(agent.node_id, None) is None:
                return
            states = {status.id: status.state for status in agent.streams}
            orphans = [
                placed
                for placed in self._placed.values()
                if placed.node == agent.node_id and states.get(placed.id) not in OVER
            ]
            for placed in orphans:
                placed.node, placed.moved_from, placed.lost_at = None, agent.name, now
            self.reassignments += len(orphans)
        if retry:
            self._retry_at[agent.node_id] = now + 30.0
        moving = ", ".join(placed.id for placed in orphans) or "no stream"
        log.warning("node %s lost (%s): moving %s", agent.name, why, moving)
        try:
            self._ray.kill(agent.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - on a dead node it is gone already
            pass

    def _least_loaded(self, labels: dict[str, str]) -> _Agent | None:
        """The ready node with the fewest streams whose labels include `labels` (call with
        the lock held)."""
        load = {node_id: 0 for node_id in self._agents}
        for placed in self._placed.values():
            if placed.node in load:
                load[placed.node] += 1
        matching = [
            agent
            for agent in self._agents.values()
            if agent.ready and labels_match(labels, agent.labels)
        ]
        return min(matching, key=lambda agent: (load[agent.node_id], agent.name), default=None)

    def _place_waiting(self) -> None:
        with self._lock:
            waiting = [p for p in self._placed.values() if p.node is None and p.failed is None]
        for placed in waiting:
            with self._lock:
                agent = self._least_loaded(placed.entry.labels)
                if agent is None or self._placed.get(placed.id) is not placed:
                    continue
                if placed.moved_from is None and self._loading(placed.entry.labels):
                    continue  # at start: spread over the nodes still loading too
                placed.node = agent.node_id
            self._start_on(agent, placed)

    def _loading(self, labels: dict[str, str]) -> bool:
        """Whether a node matching `labels` is still loading its models (for up to
        SPREAD_WAIT_S: a node that takes longer gets the cameras that come later)."""
        now = time.monotonic()
        return any(
            not agent.ready and now - agent.started < SPREAD_WAIT_S
            and labels_match(labels, agent.labels)
            for agent in self._agents.values()
        )  # fmt: skip

    def _start_on(self, agent: _Agent, placed: _Placed) -> None:
        """Start a waiting stream on `agent`'s node (the supervisor's placement)."""
        try:
            self._ask_start(agent, placed)
        except ValueError as error:  # this node cannot open it: say so on the stream
            placed.failed = first_line(error)
            log.warning("stream %s cannot start on %s: %s", placed.id, agent.name, placed.failed)

    def _ask_start(self, agent: _Agent, placed: _Placed) -> StreamStatus | None:
        """Ask `agent`'s node, which `placed` is reserved for, to start it: its status, or
        None when the node is slow (it starts there; its snapshots will tell) or went away
        (the stream waits to be placed again).

        Raises:
            ValueError: one line: the node cannot open the source.
        """
        entry = placed.entry
        try:
            ref = agent.handle.add.remote(str(entry.source), placed.id, entry, placed.moved_from)
            status = self._call(ref, CALL_TIMEOUT_S)
        except ValueError:
            raise
        except TimeoutError:
            log.warning("stream %s: node %s is slow to start it", placed.id, agent.name)
            return None
        except Exception as error:  # noqa: BLE001 - the node went
            placed.node = None
            log.warning("stream %s: node %s: %s", placed.id, agent.name, first_line(error))
            return None
        if placed.lost_at is None:
            log.info("stream %s on node %s: %s", placed.id, agent.name, entry.source)
        else:
            log.warning(
                "stream %s moved from %s to %s, %.1f s after its node was lost",
                placed.id, placed.moved_from, agent.name, time.monotonic() - placed.lost_at,
            )  # fmt: skip
            placed.lost_at = None
        return status

    def _call(self, ref: Any, timeout_s: float) -> Any:
        """A node's answer within `timeout_s`, its own exception (not Ray's wrapper) raised."""
        try:
            return self._ray.get(ref, timeout=timeout_s)
        except self._ray.exceptions.RayTaskError as error:
            raise root_error(error) from None

    # StreamHub's methods.

    def add(
        self, source: str, stream_id: str | None = None, entry: StreamEntry | None = None
    ) -> StreamStatus:
        """Place `source` on the least-loaded node whose labels match `entry.labels`, or keep
        it waiting for one; ValueError (one line) for a bad id or a source its node cannot
        open."""
        text = absolute_source(str(source))
        entry = dataclasses.replace(entry or StreamEntry(source=text), source=text)
        file_path = Path(text) if _names_a_file(text) else None
        with self._lock:
            if self._closed:
                raise ValueError("the stream hub is closed")
            stream_id = new_stream_id(stream_id, file_path, self._placed, self._cameras)
            placed = _Placed(stream_id, entry)
            agent = self._least_loaded(entry.labels)
            placed.node = agent.node_id if agent is not None else None
            self._placed[stream_id] = placed
        if agent is None:
            wanted = f" with labels {entry.labels}" if entry.labels else ""
            log.info("stream %s waits for a node%s", stream_id, wanted)
            return self._status_of(placed)
        try:
            status = self._ask_start(agent, placed)
        except ValueError:
            with self._lock:
                self._placed.pop(stream_id, None)
            raise
        return status or self._status_of(placed)

    def remove(self, stream_id: str) -> None:
        """Stop `stream_id` on its node and finalize its segment (KeyError: unknown id)."""
        with self._lock:
            placed = self._placed.pop(stream_id)
            agent = self._agents.get(placed.node) if placed.node is not None else None
        if agent is None:
            return
        try:
            self._call(agent.handle.remove.remote(stream_id), STOP_TIMEOUT_S + 2.0)
        except KeyError:
            pass  # it had not started there yet
        except Exception as error:  # noqa: BLE001 - a node that went has stopped it
            log.warning("stream %s: node %s: %s", stream_id, agent.name, first_line(error))

    def _status_of(self, placed: _Placed) -> StreamStatus:
        """The stream's status from its node's last snapshot, or what the head knows."""
        agent = self._agents.get(placed.node) if placed.node is not None else None
        if agent is not None:
            for status in agent.streams:
                if status.id == placed.id:
                    return status
        state = "failed" if placed.failed else "starting" if agent else "waiting"
        if placed.moved_from is not None and state == "waiting":
            state = "moving"
        return StreamStatus(
            id=placed.id, source=str(placed.entry.source), state=state, fps=0.0, faces=0,
            tracks=(), dropped=0, frames=0, latency_ms_p95=None, error=placed.failed,
            node=agent.name if agent else None,
        )  # fmt: skip

    def streams(self) -> list[StreamStatus]:
        with self._lock:
            placed = list(self._placed.values())
        return [self._status_of(each) for each in placed]

    def status(self, stream_id: str) -> StreamStatus:
        with self._lock:
            placed = self._placed[stream_id]
        return self._status_of(placed)

    def latest_jpeg(self, stream_id: str, after: int = -1) -> tuple[int, bytes] | None:
        with self._lock:
            placed = self._placed[stream_id]
            agent = self._agents.get(placed.node) if placed.node is not None else None
        if agent is None or not agent.ready:
            return None
        try:
            return self._call(agent.handle.latest_jpeg.remote(stream_id, after), JPEG_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a node going away: no image this time
            return None

    def served(self) -> set[str]:
        with self._lock:
            return set(self._placed)

    def metrics(self) -> dict:
        """StreamHub's metrics summed over the nodes, each stream with its `node`, and the
        cluster's: nodes alive and ready, streams moved, the estimator service's calls."""
        with self._lock:
            agents = [agent for agent in self._agents.values() if agent.ready]
            where = {placed.id: placed.node for placed in self._placed.values()}
        streams, service = [], []
        calls = faces = 0
        for agent in agents:
            metrics = agent.metrics
            streams += [
                {**stream, "node": agent.name}
                for stream in metrics.get("streams", [])
                if where.get(stream["id"]) == agent.node_id
            ]
            calls += metrics.get("batcher", {}).get("calls", 0)
            faces += metrics.get("batcher", {}).get("faces", 0)
            if "service" in metrics:
                service.append({**metrics["service"], "node": agent.name})
        return {
            "streams": streams,
            "batcher": {
                "calls": calls, "faces": faces, "mean_batch": round(faces / max(calls, 1), 2)
            },
            "cluster": {
                "nodes": len(agents), "reassignments": self.reassignments, "service": service
            },
        }  # fmt: skip

    def close(self) -> list[str]:
        """Stop every stream on every node and finalize their segments (waits up to
        CLOSE_TIMEOUT_S), then leave the cluster; each stream's summary."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self._supervisor.join(SUPERVISE_EVERY_S * 4)
        ray = self._ray
        agents = list(self._agents.values())
        closing = {agent.handle.close.remote(): agent for agent in agents if agent.ready}
        summaries: list[str] = []
        done, late = (
            ray.wait(list(closing), num_returns=len(closing), timeout=CLOSE_TIMEOUT_S)
            if closing
            else ([], [])
        )
        for ref in done:
            try:
                summaries += ray.get(ref, timeout=0)
            except Exception as error:  # noqa: BLE001 - the other nodes' summaries still count
                summaries.append(f"node {closing[ref].name}: {first_line(root_error(error))}")
        for ref in late:
            log.warning("node %s still finalizing after %.0f s", closing[ref].name, CLOSE_TIMEOUT_S)
        for agent in agents:
            try:
                ray.kill(agent.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.config.serve.estimator_service:
            from ray import serve

            serve.shutdown()  # its controller is detached: it would outlive this process
        ray.shutdown()
        return summaries

    def __enter__(self) -> ClusterHub:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
