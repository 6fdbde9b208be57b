"""Prometheus metrics through Ray's metrics API, named like vLLM's where the meaning is the same.

Ray exports them with its ``ray_`` prefix from every node's metrics endpoint (vLLM's
``vllm:time_to_first_token_seconds`` is ours as ``ray_nika_time_to_first_token_seconds``).
Metric objects must be created inside a Ray worker, so each deployment builds its set once
per process with :func:`router_metrics` / :func:`replica_metrics`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_TOKEN_GAP_S = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5]


@dataclass(frozen=True)
class RouterMetrics:
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_request_latency: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    deadline_expirations: Counter
    cancellations: Counter
    rejected_requests: Counter
    image_decode_failures: Counter
    batch_lines: Counter


@dataclass(frozen=True)
class ReplicaMetrics:
    requests_running: Gauge
    requests_waiting: Gauge
    kv_cache_usage_perc: Gauge
    batch_size: Gauge
    prefix_cache_queries: Counter
    prefix_cache_hits: Counter
    engine_steps: Counter
    engine_passes: Counter
    admission_seconds: Counter
    kv_copies: Counter
    kv_copy_bytes: Counter
    kv_copy_seconds: Counter
    sampled_tokens: Counter


# The engine's own counters (``Engine.stats``) published as Prometheus counters: the metric
# (a field of ReplicaMetrics) and the labels that tell its series apart.
ENGINE_COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "prefix_cache_queries": ("prefix_cache_queries", {}),
    "prefix_cache_hits": ("prefix_cache_hits", {}),
    "steps": ("engine_steps", {}),
    "passes": ("engine_passes", {}),
    "admit_seconds": ("admission_seconds", {}),
    "kv_saves": ("kv_copies", {"direction": "save"}),
    "kv_restores": ("kv_copies", {"direction": "restore"}),
    "kv_save_bytes": ("kv_copy_bytes", {"direction": "save"}),
    "kv_restore_bytes": ("kv_copy_bytes", {"direction": "restore"}),
    "kv_save_seconds": ("kv_copy_seconds", {"direction": "save"}),
    "kv_restore_seconds": ("kv_copy_seconds", {"direction": "restore"}),
    "backend_sampled": ("sampled_tokens", {"where": "graph"}),
    "host_sampled": ("sampled_tokens", {"where": "host"}),
}


@functools.cache
def router_metrics() -> RouterMetrics:
    """Per model and priority: ``interactive`` requests, ``background`` batch lines (the batch
    runner serves those through the same core, so its process publishes them)."""
    model = ("model", "priority")
    return RouterMetrics(
        time_to_first_token=Histogram(
            "nika_time_to_first_token_seconds", "Time to the first token, queueing included.", _LATENCY_S, model
        ),
        inter_token_latency=Histogram(
            "nika_inter_token_latency_seconds", "Time between consecutive chunks of a stream.", _TOKEN_GAP_S, model
        ),
        e2e_request_latency=Histogram(
            "nika_e2e_request_latency_seconds", "Time from the request to its last token.", _LATENCY_S, model
        ),
        prompt_tokens=Counter("nika_prompt_tokens_total", "Prompt tokens processed.", model),
        generation_tokens=Counter("nika_generation_tokens_total", "Tokens generated.", model),
        deadline_expirations=Counter(
            "nika_deadline_expirations_total", "Requests ended by a deadline, by which one.", (*model, "reason")
        ),
        cancellations=Counter("nika_cancellations_total", "Requests cancelled or abandoned by the client.", model),
        rejected_requests=Counter(
            "nika_rejected_requests_total", "HTTP requests refused (4xx, 503), by error code.", ("cause",)
        ),
        image_decode_failures=Counter("nika_image_decode_failures_total", "Images refused by the router."),
        batch_lines=Counter(
            "nika_batch_lines_total", "Batch lines answered, by outcome (ok, failed).", ("model", "outcome")
        ),
    )


@functools.cache
def replica_metrics() -> ReplicaMetrics:
    model = ("model",)
    return ReplicaMetrics(
        requests_running=Gauge("nika_num_requests_running", "Sequences running in the engine's batch.", model),
        requests_waiting=Gauge("nika_num_requests_waiting", "Requests in a replica waiting for a slot.", model),
        kv_cache_usage_perc=Gauge("nika_kv_cache_usage_perc", "KV-cache usage: 1 is full.", model),
        batch_size=Gauge("nika_batch_size", "Sequences decoded in the engine's last step.", model),
        prefix_cache_queries=Counter("nika_prefix_cache_queries_total", "Prompt tokens looked up in the cache.", model),
        prefix_cache_hits=Counter("nika_prefix_cache_hits_total", "Prompt tokens found in the cache.", model),
        engine_steps=Counter("nika_engine_steps_total", "Batches the engine decoded.", model),
        engine_passes=Counter(
            "nika_engine_passes_total", "Passes over the weights for those batches (llama.cpp's ubatches).", model
        ),
        admission_seconds=Counter(
            "nika_admission_seconds_total", "Time spent admitting requests between steps: running streams wait.", model
        ),
        kv_copies=Counter(
            "nika_kv_cache_copies_total", "Prompts' KV state copied to host memory or back.", ("model", "direction")
        ),
        kv_copy_bytes=Counter("nika_kv_cache_copy_bytes_total", "Bytes of those copies.", ("model", "direction")),
        kv_copy_seconds=Counter("nika_kv_cache_copy_seconds_total", "Time in those copies.", ("model", "direction")),
        sampled_tokens=Counter(
            "nika_sampled_tokens_total", "Tokens sampled in the decode graph or on the host.", ("model", "where")
        ),
    )
