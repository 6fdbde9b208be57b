"""What every comparison shares: the models, our stack, where results go."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf

from benchmarks.systems import OurStack
from deployments.config import AppConfig, GGUFModelConfig, VisionModelConfig

GGUF_MODEL = "medium-llama-Q4_K_M.gguf"  # ~7 ms/token at 2 threads, ~14 ms at 1 on the dev machines
VISION_MODEL = "tiny-idefics3"


@dataclass
class BenchContext:
    models_dir: Path
    results_dir: Path
    ours: OurStack
    quick: bool = False
    gpu: bool = False
    peer_port: int = 8101

    def gguf_model(self, replicas: int = 1, cpus: int = 1, parallel: int = 1) -> GGUFModelConfig:
        """The medium GGUF model; each replica runs ``parallel`` sequences on ``cpus`` llama.cpp threads."""
        return GGUFModelConfig.model_validate(
            {
                "name": "medium",
                "path": self.models_dir / GGUF_MODEL,
                "context_size": 2048,
                "gpu_layers": -1 if self.gpu else 0,
                "parallel": parallel,
                "deployment": {
                    "num_replicas": replicas,
                    "max_ongoing_requests": parallel + 3,
                    "ray_actor_options": {"num_cpus": cpus, "num_gpus": 1 if self.gpu else 0},
                },
            }
        )

    def vision_model(self) -> VisionModelConfig:
        return VisionModelConfig.model_validate(
            {
                "name": "vision",
                "path": self.models_dir / VISION_MODEL,
                "context_size": 4096,
                "kv_cache_bytes": 128 * 2**20,
                "deployment": {
                    "num_replicas": 1,
                    "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if self.gpu else 0},
                },
            }
        )

    def app_config(self, *models: GGUFModelConfig | VisionModelConfig) -> AppConfig:
        return AppConfig.model_validate(
            {
                "router": {"deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}},
                "batch": {
                    "database": str(self._batch_dir / "batches.sqlite3"),
                    "files_uri": str(self._batch_dir / "files"),
                },
                "models": [m.model_dump(mode="json") for m in models],
            }
        )

    @cached_property
    def _batch_dir(self) -> Path:
        """This run's Batch API store: no earlier run's unfinished batch resumes in it."""
        return Path(tempfile.mkdtemp(prefix="nika-bench-batches-"))

    def save(self, name: str, result: dict[str, Any]) -> Path:
        path = self.results_dir / f"{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        return path


def eos_token_id(path: Path) -> int:
    """The EOS token id from the GGUF header (for the peer's logit bias)."""
    field = gguf.GGUFReader(path).fields[gguf.Keys.Tokenizer.EOS_ID]
    return int(field.contents())
