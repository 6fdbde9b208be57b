"""Where a model's replicas run: the Ray resources one replica reserves, and whether a cluster's
node types can hold them.

A replica that is one process asks for its resources in ``ray_actor_options``; a GGUF replica
spanning several GPUs is such a process (llama.cpp splits the model over the GPUs Ray gives it).
A vLLM model split over workers (tensor x pipeline parallel) reserves every worker in a placement
group of its own (Serve's ``placement_group_bundles``, as Ray Serve LLM does): the replica actor
shares the first bundle with worker 0, and each further worker has a bundle. Serve creates the
group with the replica and removes it with the replica, so autoscaling adds and removes a
replica with its whole group; vLLM's workers run inside it.

``python -m deployments.config CONFIG --cluster FILE`` checks a Serve config against the node
types of a ``ray up`` file or a KubeRay ``RayService`` before anything is deployed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Strategy = Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"]
Resources = dict[str, float]

ACCELERATOR_PREFIX = "accelerator_type:"
# Ray's own hint for an accelerator type: a sliver of the node's accelerator_type resource.
ACCELERATOR_HINT = 0.001


def accelerator_resource(name: str) -> str:
    return ACCELERATOR_PREFIX + name


def actor_resources(actor_options: Mapping[str, Any]) -> Resources:
    """The Ray resources a replica actor with these ``ray_actor_options`` takes."""
    resources: Resources = {"CPU": float(actor_options.get("num_cpus", 1))}
    if actor_options.get("num_gpus"):
        resources["GPU"] = float(actor_options["num_gpus"])
    if actor_options.get("memory"):
        resources["memory"] = float(actor_options["memory"])
    if actor_options.get("accelerator_type"):
        resources[accelerator_resource(actor_options["accelerator_type"])] = ACCELERATOR_HINT
    resources |= {name: float(amount) for name, amount in (actor_options.get("resources") or {}).items()}
    return resources


def _added(a: Mapping[str, float], b: Mapping[str, float]) -> Resources:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in {*a, *b}}


@dataclass(frozen=True, slots=True)
class Placement:
    """What one replica reserves: its actor's options, and the group it shares with its workers."""

    actor_options: dict[str, Any]
    bundles: list[Resources] | None = None
    strategy: Strategy | None = None

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of ``Deployment.options`` this placement sets."""
        options: dict[str, Any] = {"ray_actor_options": self.actor_options}
        if self.bundles is not None:
            options |= {"placement_group_bundles": self.bundles, "placement_group_strategy": self.strategy}
        return options

    def demand(self) -> list[Resources]:
        """The resources to find on the cluster: one entry per bundle, or the actor's alone."""
        return self.bundles if self.bundles is not None else [actor_resources(self.actor_options)]


def worker_group(actor_options: Mapping[str, Any], workers: int, worker: Resources, strategy: Strategy) -> Placement:
    """A replica actor and ``workers`` workers of ``worker`` resources each, in one group.

    The actor keeps its CPUs, memory and custom resources and gives up its GPUs: they belong to
    the workers' bundles (the actor lands in bundle 0, with worker 0).
    """
    actor = {key: value for key, value in actor_options.items() if key not in ("num_gpus", "accelerator_type")}
    actor_bundle = actor_resources(actor)
    bundles = [dict(worker) for _ in range(workers)]
    bundles[0] = _added(actor_bundle, bundles[0])
    return Placement(actor | {"num_gpus": 0}, bundles, strategy)


# -- the cluster's node types ------------------------------------------------------------


class LayoutError(ValueError):
    """A config that a cluster's node types cannot hold, or a cluster file that does not say its nodes."""


@dataclass(frozen=True, slots=True)
class NodeType:
    """A kind of node a cluster can have, with the Ray resources each node of it offers."""

    name: str
    resources: Resources = field(default_factory=dict)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def accelerator_types(self) -> list[str]:
        return [key.removeprefix(ACCELERATOR_PREFIX) for key in self.resources if key.startswith(ACCELERATOR_PREFIX)]

    def holds(self, demand: Mapping[str, float]) -> bool:
        return all(self.resources.get(key, 0.0) >= amount - 1e-9 for key, amount in demand.items() if amount > 0)


def node_types_of_ray_up(config: Mapping[str, Any]) -> list[NodeType]:
    """Node types of a ``ray up`` cluster file: each type's ``resources``, which must name its CPUs
    (Ray fills them in from the instance type only when it starts the node)."""
    types = []
    for name, spec in config["available_node_types"].items():
        resources = {key: float(value) for key, value in (spec.get("resources") or {}).items()}
        if "CPU" not in resources:
            raise LayoutError(f"node type {name}: write its CPU (and GPU) count in resources for the layout check")
        types.append(NodeType(name, resources))
    return types


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity of CPUs or devices: ``"16"``, ``"500m"``, ``2``."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def node_types_of_rayservice(manifest: Mapping[str, Any]) -> list[NodeType]:
    """Node types of a KubeRay ``RayService``: the head and each worker group, as KubeRay starts
    Ray in them (``rayStartParams`` first, then the container's resource limits)."""
    cluster = manifest["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    types = []
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpus = params.get("num-cpus", limits.get("cpu"))
        if cpus is None:
            raise LayoutError(f"group {name}: set its container's cpu limit or rayStartParams num-cpus")
        resources = {"CPU": _quantity(cpus), "GPU": _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
        if "resources" in params:  # a JSON object, quoted once more for the command line
            text = params["resources"].strip()
            text = json.loads(text) if text.startswith('"') else text
            resources |= {key: float(value) for key, value in json.loads(text).items()}
        types.append(NodeType(name, resources))
    return types


def node_types_of(path: Path) -> list[NodeType]:
    """Node types of a cluster file: a ``ray up`` config or a KubeRay ``RayService`` manifest."""
    import yaml

    document = yaml.safe_load(path.read_text())
    if document.get("kind") == "RayService":
        return node_types_of_rayservice(document)
    if "available_node_types" in document:
        return node_types_of_ray_up(document)
    raise LayoutError(f"{path}: neither a ray up cluster config nor a RayService manifest")


def layout_problems(
    model: str, placement: Placement, nodes: Iterable[NodeType], *, same_node_gpus: int = 1, isq: str | None = None
) -> list[str]:
    """Why the cluster cannot place one replica of ``model`` (empty when it can).

    ``same_node_gpus``: GPUs that must share one node (tensor-parallel ranks exchange
    activations in every layer; a GGUF replica is one process); ``isq``: a vLLM online
    quantization method, which must suit every GPU the replica may land on.
    """
    from deployments.quantization import check_isq_on_gpu

    nodes = list(nodes)
    problems = []
    largest = max(nodes, key=lambda n: n.gpus, default=NodeType("none"))
    if same_node_gpus > largest.gpus:
        problems.append(
            f"model {model}: needs {same_node_gpus} GPUs on one node, but the largest node type "
            f"({largest.name}) has {largest.gpus:g}: lower tensor_parallel_size (pipeline_parallel_size may cross "
            f"nodes) or add a node type with {same_node_gpus} GPUs"
        )
    demand = placement.demand()
    if placement.strategy == "STRICT_PACK":
        demand = [sum_resources(demand)]  # the whole group on one node
    for bundle in demand:
        if not any(node.holds(bundle) for node in nodes):
            wanted = ", ".join(f"{key}: {value:g}" for key, value in sorted(bundle.items()))
            problems.append(f"model {model}: no node type offers {{{wanted}}} on one node")
    if isq is not None:
        hosts = [node for node in nodes if node.gpus and any(node.holds(b) for b in demand)]
        for node in hosts:
            for accelerator in node.accelerator_types:
                try:
                    check_isq_on_gpu(isq, accelerator)
                except ValueError as exc:
                    problems.append(f"model {model} on node type {node.name}: {exc}")
    return problems


def sum_resources(bundles: Iterable[Mapping[str, float]]) -> Resources:
    total: Resources = {}
    for bundle in bundles:
        total = _added(total, bundle)
    return total
