"""Cluster mode's node-failure recovery and memory on this machine (README, "Several machines").

Not a CI test (tests/test_cluster.py kills one node). A local Ray cluster of a head and two
worker nodes of one CPU each, with the settings `agestream cluster head` runs it with, serves
the given clips (looping, as cameras) through `ClusterHub`; then, KILLS times, the worker with
the most streams is removed without grace (SIGKILL of its raylet and workers), the time until
each of its streams runs on another node is taken, and a fresh worker joins for the next round.
The resident memory of every process of the cluster (GCS, raylets, agents, workers: the node
agents hold the models) is summed before the first kill.

    python tools/cluster_recovery.py CLIP1 CLIP2 CLIP3 CLIP4 --kills 3 --out runs/recovery.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from ray.cluster_utils import Cluster

from stream.cluster import ClusterHub, node_name
from stream.cluster_command import HEAD_NODE_ARGS, process_tree
from stream.config import load_config, override


def tree_rss_mb(roots: set[int]) -> tuple[float, int]:
    """Resident memory (MB) of `roots` and every process under them, and how many."""
    pids, total_kb = process_tree(roots), 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total_kb += sum(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return total_kb / 1024, len(pids)


def cluster_roots(cluster: Cluster) -> set[int]:
    nodes = [cluster.head_node, *cluster.worker_nodes]
    return {
        info.process.pid
        for node in nodes
        for infos in node.all_processes.values()
        for info in infos
        if info.process is not None
    }


def wait_running(hub: ClusterHub, ids: list[str], away_from: str | None, limit_s: float) -> float:
    """Seconds until every stream of `ids` runs (frames counting) on a node other than
    `away_from`."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        statuses = {s.id: s for s in hub.streams()}
        if all(
            statuses[i].state == "running" and statuses[i].frames > 0
            and statuses[i].node not in (None, away_from)
            for i in ids
        ):  # fmt: skip
            return time.monotonic() - start
        time.sleep(0.05)
    raise RuntimeError(f"streams {ids} not running within {limit_s} s")


def kill_round(cluster: Cluster, hub: ClusterHub, workers: list[Any]) -> dict:
    """Kill the busiest worker, time its streams' move, add a fresh worker."""
    placed: dict[str, list[str]] = {}
    for status in hub.streams():
        placed.setdefault(str(status.node), []).append(status.id)
    victim = max(workers, key=lambda node: len(placed.get(node_name_of(node), [])))
    moving = placed.get(node_name_of(victim), [])
    killed_at = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    workers.remove(victim)
    wait_running(hub, moving, node_name_of(victim), 60)
    recovery_s = time.monotonic() - killed_at
    workers.append(cluster.add_node(num_cpus=1))
    deadline = time.monotonic() + 240
    while hub.metrics()["cluster"]["nodes"] < 2:  # the fresh worker's agent has its models
        if time.monotonic() > deadline:
            raise RuntimeError("the fresh worker was not ready within 240 s")
        time.sleep(0.2)
    return {"killed": node_name_of(victim), "streams": moving, "recovery_s": round(recovery_s, 2)}


def node_name_of(node: Any) -> str:
    return node_name({"NodeManagerAddress": node.node_ip_address, "NodeID": node.node_id})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clips", nargs="+")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, **HEAD_NODE_ARGS},
    )
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        config = override(load_config(None), "serve", loop=True)
        with ClusterHub(config, cluster.address) as hub:
            ids = [hub.add(str(Path(clip).absolute())).id for clip in args.clips]
            wait_running(hub, ids, None, 240)
            time.sleep(10)
            rss, processes = tree_rss_mb(cluster_roots(cluster))
            rounds = [kill_round(cluster, hub, workers) for _ in range(args.kills)]
        recoveries = [r["recovery_s"] for r in rounds]
        result = {
            "streams": len(ids), "ray_rss_mb": round(rss, 1), "ray_processes": processes,
            "rounds": rounds, "median_recovery_s": statistics.median(recoveries),
        }  # fmt: skip
    finally:
        cluster.shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
