"""`agestream cluster`: a real Ray head and a labelled worker on this machine, their status, a
stop that ends exactly their processes, and the one-line errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream import cluster_command
from stream.cluster_command import ClusterError, load_records, node_processes, parse_labels
from tests.conftest import free_port, wait_for

pytest.importorskip("ray", reason="agestream cluster runs Ray: pip install 'agestream[cluster]'")

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def agestream_cluster(
    state: Path, *args: str, timeout_s: float = 120
) -> subprocess.CompletedProcess:
    """`agestream cluster ARGS` in a process of its own, recording nodes in `state`."""
    env = dict(os.environ, AGESTREAM_CLUSTER_STATE=str(state))
    return subprocess.run(
        [sys.executable, "-m", "stream.cluster_command", "cluster", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes whose session id is `session`, read from /proc."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            if fields[0] != "Z" and int(fields[3]) == session:
                members.append(int(entry.name))
    return members


def kill_sessions(sessions: list[int]) -> None:
    for session in sessions:
        for pid in session_members(session):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A head (1 CPU) and a worker labelled zone=a,gpu=no; whatever they started is killed by
    pid at the end, whether the tests passed or not."""
    state = tmp_path_factory.mktemp("cluster-state")
    try:
        head = agestream_cluster(state, "head", "--port", str(free_port()), "--num-cpus", "1")
        assert head.returncode == 0, head.stderr
        address = head.stdout.split("join from another machine with: agestream cluster join ")[1]
        address = address.split()[0]
        labels = ("--labels", "zone=a,gpu=no")
        join = agestream_cluster(state, "join", address, "--num-cpus", "1", *labels)
        assert join.returncode == 0, join.stderr
        yield state, address
    finally:
        kill_sessions([record.leader.pid for record in load_records(state)])


@pytest.fixture
def independent_head(tmp_path: Path) -> Iterator[int]:
    """A Ray head started with plain `ray start --block` in a session of its own: its pid."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    with (tmp_path / "ray.log").open("wb") as log:
        child = subprocess.Popen(
            [*RAY, "start", "--head", "--port", str(free_port()), "--num-cpus", "1", "--block"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    try:
        wait_for(lambda: "Ray runtime started." in (tmp_path / "ray.log").read_text(), 120)
        yield child.pid
    finally:
        kill_sessions([child.pid])
        child.wait(timeout=10)


def test_given_head_and_worker_when_status_then_both_alive_with_the_workers_labels(
    cluster: tuple[Path, str],
) -> None:
    state, address = cluster
    status = agestream_cluster(state, "status")
    assert status.returncode == 0, status.stderr
    table = status.stdout.split(f"nodes of the cluster at {address}:\n")[1].splitlines()
    alive = [line for line in table[1:] if "  alive  " in line]
    assert len(alive) == 2, status.stdout
    (head,) = [line for line in alive if "  head  " in line]
    (worker,) = [line for line in alive if "  worker  " in line]
    assert "zone=a" in worker and "gpu=no" in worker and "zone" not in head
    assert status.stdout.count(f"of {address}: running ray start ") == 2
    again = agestream_cluster(state, "status", "--address", address)
    assert again.stdout.count("  alive  ") == 2, again.stdout


def test_given_an_independent_ray_when_stop_then_only_our_processes_end(
    cluster: tuple[Path, str], independent_head: int
) -> None:
    state, _ = cluster
    records = load_records(state)
    ours = [proc for record in records for proc in node_processes(record)]
    assert {"gcs_server", "raylet"} <= {proc.name for proc in ours}
    others = session_members(independent_head)
    assert len(others) >= 4  # ray start, gcs_server, raylet, agents

    stop = agestream_cluster(state, "stop", timeout_s=60)

    assert stop.returncode == 0, stop.stderr
    assert "stopped the worker" in stop.stdout and "stopped the head" in stop.stdout
    still = [proc.pid for proc in ours if Path(f"/proc/{proc.pid}").exists()]
    still = [pid for pid in still if "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]]
    assert still == []
    assert all(session_members(record.leader.pid) == [] for record in records)
    assert set(others) <= set(session_members(independent_head))
    again = agestream_cluster(state, "stop")
    assert again.returncode == 0 and "nothing to stop" in again.stdout


@pytest.mark.parametrize("labels", ["zone", "zone=a,=b", "zone=a b", "ray.io/x=1", "a=b=c"])
def test_given_bad_labels_when_join_then_one_line_and_exit_2(tmp_path: Path, labels: str) -> None:
    result = agestream_cluster(tmp_path, "join", "127.0.0.1:6379", "--labels", labels)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "bad label" in result.stderr
    assert not list(tmp_path.iterdir())  # nothing was started or recorded


def test_given_labels_when_parsed_then_a_dict() -> None:
    assert parse_labels("zone=hall, gpu=no,tier=") == {"zone": "hall", "gpu": "no", "tier": ""}
    assert parse_labels("") == {}
    with pytest.raises(ClusterError):
        parse_labels("k=v!")


def test_given_bad_or_silent_head_address_when_join_then_one_line(tmp_path: Path) -> None:
    bad = agestream_cluster(tmp_path, "join", "no-port-here")
    assert bad.returncode == 2 and "bad head address 'no-port-here'" in bad.stderr
    silent = f"127.0.0.1:{free_port()}"
    gone = agestream_cluster(tmp_path, "join", silent)
    assert gone.returncode == 1 and f"no Ray head answers at {silent}" in gone.stderr
    assert gone.stderr.count("\n") == 1


def test_given_a_port_in_use_when_head_then_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = agestream_cluster(tmp_path, "head", "--port", str(port))
    assert result.returncode == 1
    assert f"port {port} is in use" in result.stderr and result.stderr.count("\n") == 1


def test_given_zero_cpus_when_head_then_usage_error(tmp_path: Path) -> None:
    result = agestream_cluster(tmp_path, "head", "--num-cpus", "0")
    assert result.returncode == 2 and "expected a positive whole number" in result.stderr


def test_given_nothing_started_when_status_then_asks_for_an_address(tmp_path: Path) -> None:
    result = agestream_cluster(tmp_path, "status")
    assert result.returncode == 2 and "give --address HOST:PORT" in result.stderr


def test_given_no_ray_when_cluster_then_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails; find_spec says None
    monkeypatch.setenv("AGESTREAM_CLUSTER_STATE", str(tmp_path))
    assert cluster_command.main(["cluster", "stop"]) == 2
    assert capsys.readouterr().err == f"{cluster_command.RAY_MISSING}\n"
