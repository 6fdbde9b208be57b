"""``GET /v1/models``: one card per model, merged from its replicas' reports, or from Serve's
controller while none answers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig, ModelConfig
from deployments.constants import MODEL_INFO_TIMEOUT_S
from deployments.engines import engine_class
from deployments.engines.base import ModelFacts, ModelInfo, ModelStatus
from deployments.protocol.common import model_card
from deployments.replica import deployment_name


def _deployment_state(deployment: str) -> tuple[ModelStatus, str | None]:
    """A model deployment's state from Serve's controller, for when no replica can say."""
    app = serve.get_replica_context().app_name
    state = serve.status().applications[app].deployments.get(deployment)
    if state is None or state.status in ("UPDATING", "UPSCALING"):
        return ModelStatus.LOADING, (state.message or None) if state else None
    return ModelStatus.FAILED, state.message or f"deployment {deployment} is {state.status}"


def _facts(model: ModelConfig) -> ModelFacts:
    """What the model's files say, for its card while no replica answers; the router's node may
    lack the files (they need only be where the model's replicas run), or one may be unreadable."""
    try:
        return engine_class(model.kind).describe(model)
    except Exception:
        return ModelFacts(model.path.stem, model.path.stat().st_size if model.path.is_file() else 0, None)


# Engine stats that describe one replica rather than add up over replicas: the highest is shown.
_PER_REPLICA_STATS = frozenset({"parallel", "kv_cache_usage_perc", "peak_batch_size"})


def _merge_stats(reports: list[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for stats in reports:
        for name, value in stats.items():
            merged[name] = (
                max(merged.get(name, value), value) if name in _PER_REPLICA_STATS else merged.get(name, 0) + value
            )
    return merged


class ModelCatalog:
    def __init__(self, config: AppConfig, handles: Mapping[str, DeploymentHandle]) -> None:
        self._config = config
        self._handles = dict(handles)
        self._facts = {m.name: _facts(m) for m in config.models}
        self._created = int(time.time())

    async def list_models(self) -> list[dict[str, Any]]:
        infos = await asyncio.gather(*(self._model_info(m) for m in self._config.models))
        return [model_card(info, self._created) for info in infos]

    async def _model_info(self, model: ModelConfig) -> ModelInfo:
        """Merge the replicas' reports: one card per model, generations summed."""
        try:
            reports = (
                await self._handles[model.name]
                .broadcast("info")
                .results_async(timeout_s=MODEL_INFO_TIMEOUT_S, return_exceptions=True)
            )
        except Exception as exc:  # no replica running (starting, failed) or no answer in time
            reports = [exc]
        infos = [r for r in reports if isinstance(r, ModelInfo)]
        if not infos:  # no replica answered: ask Serve why (starting, failed to load, ...)
            status, error = await asyncio.to_thread(_deployment_state, deployment_name(model.name))
            return ModelInfo.describe(model, self._facts[model.name], status, error=error)
        replicas: dict[ModelStatus, int] = {}
        for info in infos:
            for status, count in info.replicas.items():
                replicas[status] = replicas.get(status, 0) + count
        active = sum(i.active_generations for i in infos)
        return infos[0].model_copy(
            update={
                "engine_stats": _merge_stats([i.engine_stats for i in infos]),
                "status": next(iter(replicas)) if len(replicas) == 1 else ModelStatus.MIXED,
                "replicas": replicas,
                "active_generations": active,
                "idle_since": None if active else max((i.idle_since for i in infos if i.idle_since), default=None),
                "error": next((i.error for i in infos if i.error), None),
            }
        )
