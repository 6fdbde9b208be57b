"""Embeddings from a llama.cpp context: inputs packed into batches, pooled per sequence.

A GGUF model configured with ``embeddings: true`` gets this instead of the generation
scheduler (llama-server's ``--embeddings``): its context outputs one pooled vector per
sequence, and many inputs share one ``llama_decode`` as sequences of one batch.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

POOLING = {"mean": 1, "cls": 2, "last": 3}  # llama_pooling_type
SEQUENCES_PER_BATCH = 16  # n_seq_max of an embeddings context


class Embedder:
    """Owns an embeddings context; ``embed`` runs on a worker thread, one call at a time."""

    def __init__(self, llama: Any, ctx: Any, model: Any, n_batch: int) -> None:
        self._llama = llama
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self._dim = llama.llama_model_n_embd(model)
        # Encoder-only models (BERT-like) run llama_encode; decoder models embed with llama_decode.
        encoder_only = llama.llama_model_has_encoder(model) and not llama.llama_model_has_decoder(model)
        self._run = llama.llama_encode if encoder_only else llama.llama_decode
        self._n_batch = n_batch
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._lock = threading.Lock()

    def embed(self, inputs: list[list[int]]) -> np.ndarray:
        """One L2-normalized vector per input (each at most ``n_batch`` tokens), as rows."""
        out = np.empty((len(inputs), self._dim), dtype=np.float32)
        with self._lock:
            start = 0
            while start < len(inputs):
                end = self._decode(inputs, start)
                for seq, row in enumerate(range(start, end)):
                    vector = self._llama.llama_get_embeddings_seq(self._ctx, seq)
                    out[row] = np.ctypeslib.as_array(vector, shape=(self._dim,))
                start = end
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _decode(self, inputs: list[list[int]], start: int) -> int:
        """Decode inputs from ``start`` as one batch of sequences; returns the first input left out."""
        batch, n, end = self._batch, 0, start
        while end < len(inputs) and end - start < SEQUENCES_PER_BATCH and n + len(inputs[end]) <= self._n_batch:
            for pos, token in enumerate(inputs[end]):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                batch.seq_id[n][0] = end - start
                batch.logits[n] = True
                n += 1
            end += 1
        batch.n_tokens = n
        self._llama.llama_memory_clear(self._memory, True)
        status = self._run(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama.cpp returned {status} while embedding")
        return end

    def close(self) -> None:
        self._llama.llama_batch_free(self._batch)
