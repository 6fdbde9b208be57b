"""Shared by every tier: the demo models, and one Ray cluster per test session.

The Serve-level tests (``tests/serve``, fake engine) and the end-to-end tests (``tests/e2e``,
real engines) run on the same Ray; each tier starts Serve for itself and shuts it down after.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# Where the test Ray's routers take their own ports: above `make serve`'s 30000, so that the
# suite runs beside a served app without finding its routers.
DIRECT_INGRESS_PORT = 30500


@pytest.fixture(scope="session")
def models_dir() -> Path:
    missing = [p for p in ("tiny-llama-Q4_K_M.gguf", "medium-llama-Q4_K_M.gguf") if not (MODELS / p).exists()]
    if missing:
        pytest.fail(f"demo models missing: {missing}; run `make models`")
    return MODELS


def poll(predicate: Callable[[], Any], timeout_s: float, what: str) -> float:
    """Wait until ``predicate()`` is truthy; return the seconds it took. Fails at the deadline."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - started


def batch_store(directory: Path) -> dict[str, str]:
    """An app's ``batch`` paths under ``directory``: each app of a test session has a store of its own."""
    return {"database": str(directory / "batches.sqlite3"), "files_uri": str(directory / "files")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class RayCluster:
    address: str
    metrics_urls: list[str]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """One multi-node Ray cluster for the whole session, inside this machine: a head, a CPU worker
    (custom resource cpu_node) and a worker standing in for GPU nodes (gpu_node). Logical CPUs:
    the replicas' reservations add up to more than the 2 real cores."""
    import ray
    from ray.cluster_utils import Cluster

    from deployments.constants import LOCAL_ENV

    metrics_ports = [free_port() for _ in range(3)]
    # Every node's processes inherit it, Serve's proxy included.
    os.environ.update(LOCAL_ENV | {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_INGRESS_PORT)})
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 8,
            "resources": {"head_node": 1},
            "include_dashboard": False,
            "metrics_export_port": metrics_ports[0],
            "object_store_memory": 512 * 2**20,
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    cluster.add_node(num_cpus=3, resources={"cpu_node": 4}, metrics_export_port=metrics_ports[1])
    cluster.add_node(num_cpus=3, resources={"gpu_node": 4}, metrics_export_port=metrics_ports[2])
    ray.init(address=cluster.address, logging_level="WARNING")
    yield RayCluster(cluster.address, [f"http://127.0.0.1:{port}/metrics" for port in metrics_ports])
    ray.shutdown()
    cluster.shutdown()
