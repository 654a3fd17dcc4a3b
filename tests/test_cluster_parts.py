"""Cluster mode's parts that need no Ray: placement by labels, the paths the nodes get, the
metrics with a node label and the estimator service's figures, the config's new keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from stream.cluster import absolute_source, labels_match, node_name
from stream.config import ConfigError, load_config, override
from stream.serve import cluster_config
from stream.web import HubCollector


def test_a_stream_goes_only_to_a_node_with_all_its_labels() -> None:
    node = {"zone": "east", "gpu": "yes"}
    assert labels_match({}, node)
    assert labels_match({"zone": "east"}, node)
    assert not labels_match({"zone": "west"}, node)
    assert not labels_match({"zone": "east", "floor": "2"}, node)


def test_nodes_get_absolute_paths_and_urls_as_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_source("clips/door.mp4") == str(tmp_path / "clips" / "door.mp4")
    assert absolute_source("rtsp://10.0.0.2/h264") == "rtsp://10.0.0.2/h264"
    assert absolute_source("0") == "0"
    config = cluster_config(override(load_config(None), "serve", output_dir="out"), "out/visits.db")
    assert config.serve.output_dir == str(tmp_path / "out")
    assert config.serve.database == str(tmp_path / "out" / "visits.db")
    url = "postgresql://agestream@db.local/site"
    assert cluster_config(load_config(None), url).serve.database == url


def test_a_node_is_named_by_its_address_and_id() -> None:
    node = {"NodeManagerAddress": "10.0.0.5", "NodeID": "69e40f5f2b8c"}
    assert node_name(node) == "10.0.0.5-69e40f"


class ClusterSnapshot:
    """What ClusterHub.metrics gives: streams with their node, the cluster's figures."""

    def metrics(self) -> dict:
        stream = {"frames": 10, "dropped": 0, "fps": 15.0, "faces": 3, "latency_ms_p95": 30.0}
        return {
            "streams": [
                {"id": "door", "node": "10.0.0.5-69e40f", "state": "running", **stream},
                {"id": "gate", "node": "10.0.0.6-ab402e", "state": "running", **stream},
            ],
            "batcher": {"calls": 4, "faces": 6, "mean_batch": 1.5},
            "cluster": {
                "nodes": 2, "reassignments": 3,
                "service": [{"node": "10.0.0.5-69e40f", "calls": 7, "fallbacks": 1,
                             "latency_p95_ms": 34.0}],
            },
        }  # fmt: skip


def test_cluster_metrics_have_a_node_label_the_nodes_moves_and_service_latency() -> None:
    registry = CollectorRegistry()
    registry.register(HubCollector(ClusterSnapshot()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'agestream_stream_fps{node="10.0.0.6-ab402e",stream="gate"} 15.0' in text
    assert (
        'agestream_stream_state{node="10.0.0.5-69e40f",state="running",stream="door"} 1.0' in text
    )
    assert "agestream_cluster_nodes 2.0" in text
    assert "agestream_cluster_reassignments_total 3.0" in text
    assert 'agestream_estimator_service_calls_total{node="10.0.0.5-69e40f"} 7.0' in text
    assert 'agestream_estimator_service_fallbacks_total{node="10.0.0.5-69e40f"} 1.0' in text
    assert 'agestream_estimator_service_latency_p95_seconds{node="10.0.0.5-69e40f"} 0.034' in text


def test_config_takes_a_cluster_address_and_stream_labels(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "serve:\n  cluster: 10.0.0.1:6379\n  estimator_service: true\n"
        "  streams:\n    - {source: a.mp4, labels: {zone: east}}\n"
    )
    config = load_config(str(good))
    assert config.serve.cluster == "10.0.0.1:6379" and config.serve.estimator_service
    assert config.serve.streams[0].labels == {"zone": "east"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  cluster: head-without-port\n")
    with pytest.raises(ConfigError, match="serve.cluster"):
        load_config(str(bad))
