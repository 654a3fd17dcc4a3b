"""`agestream cluster head|join|status|stop`: start this machine's Ray nodes with Ray's own
`ray start`, list the cluster's nodes, and stop by pid only the Ray processes it started."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.util
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream.config import LABEL_KEY as LABEL_KEY_SYNTAX
from stream.config import LABEL_PART

# The head's Ray system config. GCS health checks of every raylet: a node whose raylet is gone
# (connection refused) is marked dead after about 3 checks * 0.5 s; one that hangs or whose
# machine vanished, after about 3 * (0.5 s timeout + 0.5 s period). No worker is started ahead
# of the first driver (the head's serve needs none: 84 MB). Valid both as `ray start
# --system-config` and as `ray.cluster_utils.Cluster`'s `_system_config`.
HEAD_SYSTEM_CONFIG: dict[str, int | bool] = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
    "prestart_worker_first_driver": False,
}
# The same head for `ray.cluster_utils.Cluster(head_node_args={...})` (tests, benchmarks): no
# dashboard and no autoscaler monitor (a fixed set of machines; 90 MB), as `cluster head` runs.
HEAD_NODE_ARGS: dict[str, Any] = {
    "include_dashboard": False,
    "no_monitor": True,
    "_system_config": HEAD_SYSTEM_CONFIG,
}
EXIT_ERROR = 1
EXIT_USAGE = 2
DEFAULT_PORT = 6379
START_TIMEOUT_S = 90.0  # a head takes ~10 s on 2 busy cores
STOP_GRACE_S = 8.0  # SIGTERM, then SIGKILL what is left after this
ANSWER_TIMEOUT_S = 3.0  # a head's GCS port must accept a connection within this
RAY_MISSING = "agestream cluster needs Ray: pip install 'agestream[cluster]'"
MARKER = "AGESTREAM_CLUSTER_NODE"  # in the environment of every process of a node we start
STARTED = "Ray runtime started."  # what `ray start` logs once its node is up
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NODE_IP = re.compile(r"Local node IP: (\S+)")
LABEL_KEY = re.compile(LABEL_KEY_SYNTAX)
LABEL_VALUE = re.compile(rf"({LABEL_PART})?")  # a node's may be empty


@dataclass(frozen=True)
class Proc:
    """One process as /proc tells it: start time in clock ticks since boot (stat field 22)."""

    pid: int
    name: str
    start_ticks: int


@dataclass(frozen=True)
class NodeRecord:
    """A Ray node that `agestream cluster` started here: `leader` is the detached
    `ray start --block` process, whose session holds the node's other processes."""

    role: str  # head or worker
    address: str  # the head's HOST:PORT
    leader: Proc
    token: str  # the value of MARKER in the node's processes
    log: str
    started: float
    processes: tuple[Proc, ...]


class ClusterError(Exception):
    """A one-line message and the exit status it ends the command with."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def add_cluster_parser(commands: argparse._SubParsersAction) -> None:
    """The `cluster` command's parser, with its head, join, status and stop commands."""
    cluster = commands.add_parser(
        "cluster", help="start, list or stop this machine's Ray nodes for several machines"
    )
    actions = cluster.add_subparsers(dest="cluster_command", required=True)
    head = actions.add_parser("head", help="start a Ray head node on this machine")
    head.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"GCS port (default {DEFAULT_PORT})"
    )
    head.add_argument("--dashboard", action="store_true", help="also start Ray's dashboard")
    join = actions.add_parser("join", help="start a Ray worker node joined to a head")
    join.add_argument("address", metavar="HOST:PORT", help="the head's address")
    join.add_argument(
        "--labels", default="", metavar="K=V,...", help="node labels, e.g. zone=hall,gpu=no"
    )
    for start in (head, join):
        start.add_argument("--num-cpus", type=_positive_int, metavar="N", help="CPUs to offer")
        start.add_argument("--node-ip-address", metavar="IP", help="this machine's address")
        start.add_argument("--temp-dir", metavar="DIR", help="Ray's temp folder (/tmp/ray)")
    status = actions.add_parser("status", help="the cluster's nodes and this machine's part")
    status.add_argument(
        "--address", metavar="HOST:PORT", help="a head (default: the one this machine uses)"
    )
    actions.add_parser("stop", help="stop the Ray processes agestream cluster started here")


def cmd_cluster(args: argparse.Namespace) -> int:
    """Run `agestream cluster ...`; the exit status: 0, 1 (Ray failed or does not answer),
    2 (bad arguments, or Ray not installed)."""
    if importlib.util.find_spec("ray") is None:
        print(RAY_MISSING, file=sys.stderr)
        return EXIT_USAGE
    run = {"head": _head, "join": _join, "status": _status, "stop": _stop}
    try:
        run[args.cluster_command](args, state_dir())
    except ClusterError as error:
        print(f"agestream cluster {args.cluster_command}: {error}", file=sys.stderr)
        return error.status
    return 0


def main(argv: list[str] | None = None) -> int:
    """`agestream cluster ...` on its own: `python -m stream.cluster_command cluster ...`."""
    parser = argparse.ArgumentParser(prog="agestream")
    add_cluster_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_cluster(parser.parse_args(argv))


def state_dir() -> Path:
    """Where the nodes this machine started are recorded: $AGESTREAM_CLUSTER_STATE, else
    $XDG_STATE_HOME/agestream/cluster (~/.local/state/agestream/cluster)."""
    chosen = os.environ.get("AGESTREAM_CLUSTER_STATE")
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "agestream" / "cluster"


def _head(args: argparse.Namespace, folder: Path) -> None:
    _check_port_free(args.port)
    dashboard = "true" if args.dashboard else "false"
    ray_args = ["--head", "--port", str(args.port), f"--include-dashboard={dashboard}"]
    ray_args += ["--no-monitor", "--system-config", json.dumps(HEAD_SYSTEM_CONFIG)]
    record = _launch("head", ray_args + _shared_args(args), folder, f":{args.port}")
    shown = "on" if args.dashboard else "off"
    print(f"agestream cluster: Ray head at {record.address} (dashboard {shown})")
    _print_started(record)
    print(f"join from another machine with: agestream cluster join {record.address}")


def _join(args: argparse.Namespace, folder: Path) -> None:
    labels = parse_labels(args.labels)
    address = _address(args.address)
    check_answers(address)
    ray_args = ["--address", address, *_shared_args(args)]
    if labels:
        ray_args += ["--labels", ",".join(f"{key}={value}" for key, value in labels.items())]
    record = _launch("worker", ray_args, folder, address)
    shown = ", ".join(f"{key}={value}" for key, value in labels.items()) or "none"
    print(f"agestream cluster: Ray worker joined {record.address} (labels: {shown})")
    _print_started(record)


def _shared_args(args: argparse.Namespace) -> list[str]:
    shared = ["--disable-usage-stats"]
    for flag, value in (
        ("--num-cpus", args.num_cpus),
        ("--node-ip-address", args.node_ip_address),
        ("--temp-dir", args.temp_dir),
    ):
        if value is not None:
            shared += [flag, str(value)]
    return shared


def _print_started(record: NodeRecord) -> None:
    print(f"  processes: {_names(record.processes)}")
    print(f"  log: {record.log}")
    print("  stop with: agestream cluster stop")


def _names(processes: tuple[Proc, ...] | list[Proc]) -> str:
    return ", ".join(f"{proc.name} {proc.pid}" for proc in processes) or "none"


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as a dict, checked against Ray's label syntax; ClusterError (usage) else."""
    labels: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in text.split(","))):
        key, equals, value = (part.strip() for part in pair.partition("="))
        bad = not equals or "=" in value or not LABEL_KEY.fullmatch(key)
        if bad or not LABEL_VALUE.fullmatch(value) or key.startswith("ray.io/"):
            raise ClusterError(
                f"bad label {pair!r} in --labels: give key=value pairs separated by commas, "
                "letters, digits, '-', '_' and '.' (e.g. zone=hall,gpu=no)",
                EXIT_USAGE,
            )
        labels[key] = value
    return labels


def _address(text: str) -> str:
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"bad head address {text!r}: give HOST:PORT, as `agestream cluster head` printed",
            EXIT_USAGE,
        )
    return f"{host}:{port}"


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise ClusterError(f"cannot use port {port}: {error.strerror}") from None
            raise ClusterError(
                f"port {port} is in use (another Ray head?): pick a free one with --port"
            ) from None


def check_answers(address: str) -> None:
    """ClusterError unless something listens at `address` (HOST:PORT) within
    ANSWER_TIMEOUT_S: Ray itself would retry a head that is not there for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), ANSWER_TIMEOUT_S).close()
    except OSError:
        raise ClusterError(
            f"no Ray head answers at {address}: check the address, and that "
            "`agestream cluster head` runs there and its port is open"
        ) from None


def _launch(role: str, ray_args: list[str], folder: Path, address: str) -> NodeRecord:
    """`ray start ... --block` detached in a session of its own, once its node is up; on
    failure its processes are killed and ClusterError quotes the log."""
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    log = folder / f"{role}-{token}.log"
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", *ray_args, "--block"]
    with log.open("wb") as out:
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_node_environment(token),
        )
    leader = _proc(child.pid)
    if leader is None:
        raise ClusterError(f"ray start ended at once: see {log}")
    leader = dataclasses.replace(leader, name="ray start")
    record = NodeRecord(role, address, leader, token, str(log), time.time(), ())
    text = _wait_started(child, record)
    if address.startswith(":"):
        ip = NODE_IP.search(text)
        host = ip.group(1) if ip else "127.0.0.1"
        record = dataclasses.replace(record, address=f"{host}{address}")
    record = dataclasses.replace(record, processes=tuple(node_processes(record)))
    _save(record, folder)
    return record


def _node_environment(token: str) -> dict[str, str]:
    env = dict(os.environ, **{MARKER: token})
    # SIGTERM to `ray start --block` then ends the node at once instead of draining it for
    # up to 30 s (nothing of ours needs draining).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Without this, Ray turns token auth on for a head when ~/.ray/auth_token happens to
    # exist, and then workers that have no token cannot join.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def _wait_started(child: subprocess.Popen[bytes], record: NodeRecord) -> str:
    """The log once `ray start` says its node is up; ClusterError if it ends or times out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = ANSI.sub("", Path(record.log).read_text(errors="replace"))
        if STARTED in text:
            return text
        code = child.poll()
        if code is not None or time.monotonic() > deadline:
            _end([record])
            child.wait(timeout=STOP_GRACE_S)
            why = f"ended with exit status {code}" if code is not None else "timed out"
            raise ClusterError(f"ray start {why}: {_last_error(text)} (whole log: {record.log})")
        time.sleep(0.2)


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"Error|ERR|error", line)]
    return (errors or lines or ["no output"])[-1][-300:]


def _status(args: argparse.Namespace, folder: Path) -> None:
    records = load_records(folder)
    address = _address(args.address) if args.address else _default_address(records)
    if records:
        print("started here by agestream cluster:")
        for record in records:
            alive = node_processes(record)
            running = {(proc.pid, proc.start_ticks) for proc in alive}
            gone = [
                proc for proc in record.processes if (proc.pid, proc.start_ticks) not in running
            ]
            print(f"  {record.role} of {record.address}: running {_names(alive)}")
            if gone:
                print(f"    ended: {_names(gone)}")
    check_answers(address)
    print(f"nodes of the cluster at {address}:")
    print(format_nodes(read_nodes(address)))


def _default_address(records: list[NodeRecord]) -> str:
    running = [record for record in records if node_processes(record)]
    if not running:
        raise ClusterError(
            "no Ray node started here by agestream cluster runs: give --address HOST:PORT",
            EXIT_USAGE,
        )
    return running[-1].address


def read_nodes(address: str) -> list[dict[str, Any]]:
    """`ray.nodes()` of the cluster at `address`, read from its GCS without a driver (no job,
    no worker process, and it works from a machine that is no node)."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    from ray._private.state import GlobalState
    from ray._raylet import GcsClientOptions  # type: ignore[attr-defined]  # not in its .pyi

    state = GlobalState()
    options = GcsClientOptions.create(
        address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
    )
    state._initialize_global_state(options)
    try:
        return list(state.node_table())
    finally:
        state.disconnect()


def own_labels(node: dict[str, Any]) -> dict[str, str]:
    """A node's labels (`ray.nodes()`), but Ray's own (ray.io/node-id, ...)."""
    labels = node.get("Labels") or {}
    return {key: value for key, value in labels.items() if not key.startswith("ray.io/")}


def format_nodes(nodes: list[dict[str, Any]]) -> str:
    """One line per node, alive ones first: state, role, address, CPUs, own labels."""
    rows = [["node", "state", "role", "address", "CPUs", "labels"]]
    for node in sorted(nodes, key=lambda node: (not node["Alive"], node["NodeManagerAddress"])):
        resources = node.get("Resources", {})
        rows.append(
            [
                node["NodeID"][:8],
                "alive" if node["Alive"] else "dead",
                "head" if "node:__internal_head__" in resources else "worker",
                f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}",
                f"{resources['CPU']:g}" if "CPU" in resources else "-",
                ",".join(f"{k}={v}" for k, v in own_labels(node).items()) or "-",
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _stop(args: argparse.Namespace, folder: Path) -> None:
    records = load_records(folder)
    found = {record: node_processes(record) for record in records}
    if not any(found.values()):
        print("agestream cluster: nothing to stop: no Ray node started here is running")
    else:
        # Workers first, so that they do not outlive their head and log its loss.
        order = sorted(records, key=lambda record: record.role == "head")
        left = _end(order)
        for record in order:
            if found[record]:
                print(f"stopped the {record.role} of {record.address}: {_names(found[record])}")
        if left:
            raise ClusterError(f"could not end {_names(left)}: they may need root")
    for record in records:
        _record_path(record, folder).unlink(missing_ok=True)
        Path(record.log).unlink(missing_ok=True)  # Ray keeps its own logs in its temp dir


def _end(records: list[NodeRecord]) -> list[Proc]:
    """SIGTERM each node's `ray start` (it ends its own processes), or its processes when it
    is gone; SIGKILL what is left after STOP_GRACE_S. The processes not ended."""
    for record in records:
        processes = node_processes(record)
        leader = [proc for proc in processes if proc == record.leader]
        for proc in leader or processes:
            _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(map(node_processes, records)):
        time.sleep(0.1)
    for record in records:
        for proc in node_processes(record):
            _signal(proc, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(map(node_processes, records)):
        time.sleep(0.05)
    return [proc for record in records for proc in node_processes(record)]


def _signal(proc: Proc, signum: int) -> None:
    """Signal `proc` only while its pid still names the same process (same start time)."""
    now = _proc(proc.pid)
    if now is not None and now.start_ticks == proc.start_ticks:
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass


def node_processes(record: NodeRecord) -> list[Proc]:
    """The live processes of `record`'s node: those in the session of its `ray start`, started
    no earlier, once one of them shows the node's token in its environment. Ray's processes
    stay in that session; the token proves the session id was not reused (an id stays taken
    while a process is in it), since Ray's workers rewrite the environment that /proc shows."""
    members, proven = [], False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] == "Z" or stat[2] != record.leader.pid:
            continue
        if stat[3] >= record.leader.start_ticks:
            pid = int(entry.name)
            name = record.leader.name if pid == record.leader.pid else stat[0]
            members.append(Proc(pid, name, stat[3]))
            proven = proven or _has_token(pid, record.token)
    return sorted(members, key=lambda proc: proc.pid) if proven else []


def process_tree(roots: Iterable[int]) -> set[int]:
    """`roots` and every live process under them, by parent pid (what a Ray node started)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parent = int(text.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and os.path.exists(f"/proc/{pid}"):
            found.add(pid)
            todo += children.get(pid, [])
    return found


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """Name, state, session id and start time (clock ticks) of `pid`; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, _, rest = text[text.index("(") + 1 :].rpartition(")")
    fields = rest.split()  # fields[0] is stat's field 3
    return name, fields[0], int(fields[3]), int(fields[19])


def _proc(pid: int) -> Proc | None:
    stat = _stat(pid)
    return None if stat is None else Proc(pid, stat[0], stat[3])


def _has_token(pid: int, token: str) -> bool:
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER}={token}".encode() in environment.split(b"\0")


def _record_path(record: NodeRecord, folder: Path) -> Path:
    return folder / f"{record.role}-{record.token}.json"


def _save(record: NodeRecord, folder: Path) -> None:
    path = _record_path(record, folder)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(dataclasses.asdict(record), indent=1))
    partial.replace(path)


def load_records(folder: Path) -> list[NodeRecord]:
    """The nodes recorded in `folder`, oldest first; unreadable records are skipped with a
    line on stderr."""
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            data["leader"] = Proc(**data["leader"])
            data["processes"] = tuple(Proc(**proc) for proc in data["processes"])
            records.append(NodeRecord(**data))
        except (OSError, ValueError, TypeError, KeyError) as error:
            print(f"agestream cluster: skipped {path}: {error}", file=sys.stderr)
    return sorted(records, key=lambda record: record.started)


if __name__ == "__main__":
    sys.exit(main())
