"""Continuous batching for llama.cpp: many sequences in one context, one step at a time.

Shaped like llama.cpp's own server (``tools/server``: a slot per sequence, one update loop).
One thread owns the llama.cpp context. Each step it

1. drops cancelled sequences (their KV cells are freed at once) and admits waiting ones into
   free slots while the KV budget allows, reusing the longest cached prefix of a slot or of the
   prompt cache in host memory;
2. builds one batch: the next token of every generating sequence, and prompt chunks of the
   prefilling ones in the room left up to ``n_batch`` tokens, so a long prompt delays running
   streams by at most one chunk per step;
3. decodes it with one ``llama_decode``;
4. samples each sequence that has logits through its own sampler chain: inside the decode
   graph where the chain allows it (``backend_sampling``: only token ids come back), else on up
   to ``threads`` threads at once (the C sampler gives up the GIL, and the CPUs are idle between
   decodes); then detokenizes, matches stop strings, and hands the deltas to the event loop: at
   once for a first token or an ending, else at most once per ``stream_interval_s`` per sequence.

The KV cells are laid out one of two ways (``streams``). With a stream per sequence (llama.cpp's
``kv_unified=false``, llama-server's default for ``-np``) each slot owns ``context_size`` cells,
contiguous, and each sequence attends over its own cells only; llama.cpp decodes a run of
consecutive sequence ids in one pass, so a new request takes the lowest free slot and the running
ones stay one run, and a cached prefix held by another slot is copied over (a device copy). With
one unified pool (for a pool smaller than ``context_size x parallel``), any sequence may use any
cell, and every decode attends over the pool's used span.

A slot whose sequence finished keeps its KV cells as a prefix cache: a later request with the
same system prompt or the previous turn of a chat prefills only the rest. When the slot is about
to lose most of what it holds, the prompt goes to host memory (:class:`PromptCache`,
llama-server's ``--cache-ram``) and comes back into a slot for the request that continues it;
the copy is made ahead while nothing runs, so admitting the next burst mostly only frees cells.
In a unified pool finished prompts also leave the pool once another request is admitted
(``--cache-idle-slots``): there they would lengthen the span every running stream attends over.

In a unified pool the KV budget counts every running sequence at its full ``prompt +
max_tokens``, so a running stream never runs out of cells and is never evicted; a request that
does not fit waits.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.engines.base import Delta, SamplingParams, TokenLogprob, Usage
from deployments.engines.llama_sampling import Samplers
from deployments.engines.prompt_cache import CachedPrompt, PromptCache, common_prefix
from deployments.engines.text_stream import TextStream
from deployments.errors import InferenceFailed, ServeError

logger = logging.getLogger("ray.serve")

Emit = Callable[[Any], None]  # a Delta, an exception, or END; thread-safe towards the event loop
END = object()  # the stream ends (after a final Delta, or early: the caller says why)
# A cache is reused when it holds at least this share of the prompt (llama-server's
# --slot-prompt-similarity default); a smaller overlap goes to the least recently used slot.
MIN_PREFIX_SIMILARITY = 0.1
LLAMA_TOKEN_NULL = -1  # llama_get_sampled_token_ith: no token was sampled in the graph


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine. ``cancelled`` is set from the event loop, read each step."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    sampler: Any  # its llama.cpp sampler chain (``Samplers.chain``); the scheduler frees it
    emit: Emit
    # Deltas go to the event loop at most once per interval (the first at once), joined: a
    # wake-up of the replica's loop per token takes a CPU from llama.cpp's threads mid-decode.
    interval_s: float = 0.0
    sampler_key: Hashable = None  # ``Samplers.key``: an attached chain with the same one serves as well
    cancelled: bool = False
    # Scheduler state.
    prefilled: int = 0  # prompt tokens in the KV cells
    cached: int = 0  # of which reused from a slot's cache
    generated: int = 0
    next_token: int = -1  # sampled, not yet decoded
    on_backend: bool = False  # its chain runs in the decode graph (backend sampling)
    pending: list[Delta] = field(default_factory=list)  # generated, not yet emitted
    submitted_at: float = 0.0
    emitted_at: float = float("-inf")
    text: TextStream = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextStream(self.sampling.stop)

    @property
    def budget(self) -> int:
        """KV cells the sequence may come to hold."""
        return len(self.prompt) + self.sampling.max_tokens


@dataclass(eq=False, slots=True)
class Slot:
    """A llama.cpp sequence id and what its KV cells hold, in position order."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    seq: Sequence | None = None
    last_used: float = 0.0
    # The chain llama.cpp samples this seq id with in the decode graph, and its Samplers.key.
    # Every change of the context's samplers costs llama.cpp a graph reserve at the next decode,
    # so a finished sequence's chain stays attached (and alive): the next sequence with the same
    # key samples with it, reset, and any other replaces it.
    sampler: Any = None
    sampler_key: Hashable = None


@dataclass(slots=True)
class SchedulerStats:
    """The engine's own counters (the replica publishes them as metrics and in /v1/models)."""

    running: int = 0
    waiting: int = 0
    batch_size: int = 0  # sequences decoded in the last step
    peak_batch_size: int = 0
    kv_cache_usage_perc: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found in a slot's cache or the prompt cache
    prompt_cache_entries: int = 0  # prompts held in host memory
    prompt_cache_bytes: int = 0
    admitted: int = 0  # requests that got a slot
    queue_seconds: float = 0.0  # from submit to a slot, all told
    first_token_seconds: float = 0.0  # from submit to the first delta, all told (the engine's TTFT)
    steps: int = 0
    step_seconds: float = 0.0  # in steps, all told
    decode_seconds: float = 0.0  # of which in llama_decode; the rest is the host's share of a step
    # Passes over the weights llama.cpp made for those steps (its ubatches): one a step in a
    # unified pool; with a stream per sequence, one per run of consecutive sequence ids, and
    # prompt chunks take passes of their own (llama_batch_allocr::split_equal).
    passes: int = 0
    idle_seconds: float = 0.0  # waiting for work with nothing to run
    # Admission runs between steps: running streams wait for it.
    admit_seconds: float = 0.0
    admission_kv_copies: int = 0  # saves and restores made while admitting (the others while idle)
    kv_saves: int = 0  # prompts' KV state copied to host memory (the prompt cache)
    kv_save_bytes: int = 0
    kv_save_seconds: float = 0.0
    kv_restores: int = 0  # and copied back into a slot
    kv_restore_bytes: int = 0
    kv_restore_seconds: float = 0.0
    kv_stream_copies: int = 0  # a slot's stream copied into another's (a cached prefix, on the device)
    sampler_changes: int = 0  # chains attached to or detached from the decode graph (each: a graph reserve)
    backend_sampled: int = 0  # tokens sampled in the decode graph
    host_sampled: int = 0  # tokens sampled on the host from the logits

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


def _bytes_pointer(array: np.ndarray) -> Any:
    return array.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def stream_passes(batch: dict[int, int], n_ubatch: int) -> int:
    """The ubatches llama.cpp splits a batch into with a KV stream per sequence.

    ``batch`` maps each sequence id to its tokens, in batch order. ``split_equal`` in sequential
    mode (the KV views span consecutive streams) takes, for each ubatch, the sequences with tokens
    left whose ids run on from the first one's, and the same number of tokens from each.
    """
    left = dict(batch)
    passes = 0
    while True:
        run: list[int] = []
        for seq_id, n in left.items():
            if n and (not run or seq_id == run[-1] + 1):
                run.append(seq_id)
        if not run:
            return passes
        take = max(1, min(min(left[s] for s in run), n_ubatch // len(run)))
        for seq_id in run:
            left[seq_id] -= take
        passes += 1


class Scheduler:
    """Owns a llama.cpp context on its own thread; ``submit`` and ``cancel`` are thread-safe."""

    def __init__(
        self,
        llama: Any,
        ctx: Any,
        vocab: Any,
        *,
        parallel: int,
        n_batch: int,
        kv_cells: int,
        prompt_cache_bytes: int,
        threads: int = 1,
        streams: bool = False,
        backend_sampling: bool = False,
    ) -> None:
        self._llama = llama  # the llama_cpp module: C functions called per step
        self._ctx = ctx
        self._memory = llama.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_vocab = llama.llama_vocab_n_tokens(vocab)
        # Per token, the step needs a token's bytes and whether it ends the generation: both are
        # looked up here once, since every ctypes call gives up the GIL and must win it back from
        # the replica's other threads (Serve's event loops), which stalls the step under load.
        self._eog = frozenset(t for t in range(self._n_vocab) if llama.llama_vocab_is_eog(vocab, t))
        self.samplers = Samplers(llama, vocab, self._eog)
        buffer = ctypes.create_string_buffer(256)
        self._pieces = [self._token_bytes(t, buffer) for t in range(self._n_vocab)]
        self._n_batch = n_batch
        self._kv_cells = kv_cells
        self._streams = streams
        self._backend_sampling = backend_sampling
        self._batch = llama.llama_batch_init(n_batch, 0, 1)
        self._parallel = parallel
        self._threads = min(threads, parallel)
        self._samplers_pool = (
            ThreadPoolExecutor(self._threads - 1, thread_name_prefix="llama-sampler") if self._threads > 1 else None
        )
        self._slots = [Slot(i) for i in range(parallel)]
        self._prompt_cache = PromptCache(prompt_cache_bytes)
        self._submitted: deque[Sequence] = deque()  # the event loop's side, under ``_wake``
        self._waiting: deque[Sequence] = deque()  # the scheduler thread's own, in order
        self._wake = threading.Condition()
        self._stopping = False
        self._idle_saved = True  # idle slots' prompts are in host memory since the last step
        # Slots whose stream a pending copy reads (at the next decode): nothing may write their
        # buffers before it, so they take no request until then.
        self._copy_sources: set[int] = set()
        self.stats = SchedulerStats()
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        seq.submitted_at = time.monotonic()
        with self._wake:
            self._submitted.append(seq)
            self.stats.waiting += 1
            self._wake.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step; its cells are freed there."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """End every sequence (their streams end without a final delta) and join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # -- the scheduler thread ----------------------------------------------------------

    def _run(self) -> None:
        error: ServeError | None = None
        try:
            while self._next_step():
                self._step()
        except Exception as exc:  # a llama.cpp failure ends every sequence with the error
            logger.exception("llama.cpp scheduler failed")
            error = InferenceFailed(f"llama.cpp failed while generating ({type(exc).__name__})")
        finally:
            self._end_all(error)
            for slot in self._slots:
                self._attach(slot, None, None)
            self._llama.llama_batch_free(self._batch)
            if self._samplers_pool is not None:
                self._samplers_pool.shutdown()

    def _next_step(self) -> bool:
        """Wait for work, admit what fits; False once stopping.

        Admission runs outside the lock: restoring and stashing prompt caches takes milliseconds,
        and ``submit`` on the event loop must never wait for it. What was submitted meanwhile (a
        burst reaches the replica one request at a time through Serve) is admitted before the
        step too, into the same batch, as llama-server's HTTP threads queue a burst for one step.
        """
        while True:
            with self._wake:
                idle = self._idle()
                if idle and self._idle_saved:
                    waiting = time.perf_counter()
                    while idle and self._idle_saved:
                        self._wake.wait()
                        idle = self._idle()
                    self.stats.idle_seconds += time.perf_counter() - waiting
                if self._stopping:
                    return False
                self._waiting.extend(self._submitted)
                self._submitted.clear()
            if idle:
                self._save_idle_slots()
                continue
            self._drop_cancelled()
            if not self._admit() or not self._submitted:
                break
        with self._wake:
            self.stats.waiting, self.stats.running = len(self._waiting) + len(self._submitted), len(self._running())
        return True

    def _idle(self) -> bool:
        return not (self._stopping or self._submitted or self._waiting or self._running())

    def _save_idle_slots(self) -> None:
        """Copy the finished prompts that slots hold to host memory while nothing runs, slot by
        slot until a request arrives: admission then only frees their cells (``_stash`` finds
        them saved) instead of copying them while the next requests wait for their first token."""
        for slot in self._slots:
            if self._submitted:
                return
            if slot.tokens and self._prompt_cache.limit_bytes:
                self._stash(slot)
        self._idle_saved = True
        self._count_caches()

    def _running(self) -> list[Slot]:
        return [slot for slot in self._slots if slot.seq is not None]

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.seq is not None and slot.seq.cancelled:
                self._release(slot, keep_cache=False)
        if any(seq.cancelled for seq in self._waiting):
            for seq in self._waiting:
                if seq.cancelled:
                    self.samplers.free(seq.sampler)
            self._waiting = deque(seq for seq in self._waiting if not seq.cancelled)

    def _admit(self) -> bool:
        """Move waiting sequences (in order) into free slots while ``parallel`` and the KV budget
        allow; whether any was admitted."""
        started, copies = time.perf_counter(), self.stats.kv_saves + self.stats.kv_restores
        admitted = False
        while self._waiting and len(self._running()) < self._parallel and self._admit_next():
            admitted = True
        if admitted and self._prompt_cache.limit_bytes and not self._streams:
            self._clear_idle_slots()
        self.stats.admission_kv_copies += self.stats.kv_saves + self.stats.kv_restores - copies
        self.stats.admit_seconds += time.perf_counter() - started
        return admitted

    def _clear_idle_slots(self) -> None:
        """Move the caches of slots that run nothing to host memory, out of the unified pool.

        llama-server's ``--cache-idle-slots``: in a unified pool every decode visits the used span
        of cells, so a finished prompt left there slows each running stream (measured on the
        medium model, one stream at a time: 14.4 ms a token with 8 finished prompts, 3200 cells,
        left in the pool, 11.8 ms with them in host memory). With a stream per sequence an idle
        slot's cells cost the others nothing: they stay until the slot is needed.
        """
        for slot in self._slots:
            if slot.seq is None and slot.tokens:
                self._overwrite(slot, 0)

    def _admit_next(self) -> bool:
        """Admit the first waiting sequence; False if it must wait."""
        free = [slot for slot in self._slots if slot.seq is None and slot.seq_id not in self._copy_sources]
        if not free:
            return False
        seq = self._waiting[0]
        # With a stream per sequence, the lowest free slot: the running ones stay one run of ids.
        slot = free[0] if self._streams else self._pick_slot(free, seq.prompt)
        # At least one prompt token is decoded again, for the logits of the first sampled token.
        usable = len(seq.prompt) - 1
        own = min(common_prefix(slot.tokens, seq.prompt), usable)
        stored, restorable = self._prompt_cache.longest_prefix(seq.prompt)
        restorable = min(restorable, usable) if restorable >= MIN_PREFIX_SIMILARITY * len(seq.prompt) else 0
        donor, shared = self._donor(seq, slot)
        if donor is not None and shared > max(own, restorable) and len(donor.tokens) < shared:
            if shared - max(own, restorable) >= len(seq.prompt) // 2:
                return False  # mostly the prompt of a sequence still prefilling (n choices): wait for its cells
            shared = len(donor.tokens)
        if not self._fits(seq, slot):
            return False  # it waits for running sequences to finish
        self._waiting.popleft()
        reuse = max(own, shared, restorable)
        if reuse > own:  # the longest prefix is elsewhere: in another slot's cells, else in host memory
            self._overwrite(slot, 0)
            if donor is not None and shared == reuse:
                self._copy(donor, slot, shared)
            else:
                assert stored is not None
                reuse = self._restore(slot, stored, reuse)
        self._overwrite(slot, reuse)
        seq.prefilled = seq.cached = reuse
        slot.seq = seq
        self._sample_in_graph(slot, seq)
        self.stats.prefix_cache_queries += len(seq.prompt)
        self.stats.prefix_cache_hits += reuse
        self.stats.admitted += 1
        self.stats.queue_seconds += time.monotonic() - seq.submitted_at
        return True

    @staticmethod
    def _pick_slot(free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot whose cache holds the longest prefix of ``prompt``; if none holds a real
        part of it (a chat template's opening is no reason to overwrite another prompt's cache),
        the least recently used slot, empty ones first. llama-server's rule, with its threshold."""
        best = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
        if common_prefix(best.tokens, prompt) >= MIN_PREFIX_SIMILARITY * len(prompt):
            return best
        return min(free, key=lambda s: s.last_used)

    def _donor(self, seq: Sequence, target: Slot) -> tuple[Slot | None, int]:
        """The other slot whose prompt shares the longest prefix with ``seq``'s, and its length.

        In a unified pool, running slots (their cells are shared, not copied; a free slot's own
        cache is reused by choosing that slot). With a stream per sequence, any slot that holds
        at least a tenth of the prompt: its whole stream is copied on the device.
        """
        best, shared = None, 0
        for slot in self._slots:
            if slot is target or not (slot.seq is not None or self._streams):
                continue
            n = min(common_prefix(slot.seq.prompt if slot.seq else slot.tokens, seq.prompt), len(seq.prompt) - 1)
            if n > shared:
                best, shared = slot, n
        if self._streams and shared < MIN_PREFIX_SIMILARITY * len(seq.prompt):
            return None, 0
        return best, shared

    def _copy(self, donor: Slot, slot: Slot, n: int) -> None:
        """Give the emptied ``slot`` the first ``n`` cells of ``donor``."""
        if self._streams:  # llama.cpp copies only whole streams, at the next decode, before its batch
            self._llama.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, -1, -1)
            self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, n, -1)
            self._copy_sources.add(donor.seq_id)
            self.stats.kv_stream_copies += 1
        else:  # the same cells, now also the slot's
            self._llama.llama_memory_seq_cp(self._memory, donor.seq_id, slot.seq_id, 0, n)
        slot.tokens = donor.tokens[:n]

    def _sample_in_graph(self, slot: Slot, seq: Sequence) -> None:
        """Sample ``seq`` in the decode graph where its chain can run there, else on the host."""
        if not (self._backend_sampling and Samplers.offloadable(seq.sampling)):
            self._attach(slot, None, None)
        elif slot.sampler is not None and seq.sampler_key is not None and seq.sampler_key == slot.sampler_key:
            self.samplers.free(seq.sampler)  # the attached one serves: no graph reserve
            seq.sampler = slot.sampler
            self._llama.llama_sampler_reset(seq.sampler)
        else:
            self._attach(slot, seq.sampler, seq.sampler_key)
        seq.on_backend = slot.sampler is not None

    def _attach(self, slot: Slot, chain: Any, key: Hashable) -> None:
        """Sample ``slot``'s seq id in the decode graph with ``chain`` (None: on the host from the
        logits); frees the chain it replaces, which belonged to a finished sequence."""
        previous = slot.sampler
        if chain is None and previous is None:
            return
        attached = self._llama.llama_set_sampler(self._ctx, slot.seq_id, chain)
        slot.sampler = chain if attached and chain is not None else None
        slot.sampler_key = key if slot.sampler is not None else None
        self.stats.sampler_changes += 1
        if previous is not None:
            self.samplers.free(previous)

    def _committed(self) -> int:
        """KV cells held by caches plus the most that running sequences may still take."""
        return sum(max(len(s.tokens), s.seq.budget if s.seq else 0) for s in self._slots)

    def _fits(self, seq: Sequence, slot: Slot) -> bool:
        """Whether ``seq`` fits in ``slot``; moves other free slots' caches out of the pool if needed."""
        if self._streams:
            return True  # the slot's own stream holds context_size cells, which bounds every request
        need = self._committed() - len(slot.tokens) + seq.budget
        for other in sorted(self._slots, key=lambda s: s.last_used):
            if need <= self._kv_cells:
                break
            if other.seq is None and other is not slot and other.tokens:
                need -= len(other.tokens)
                self._overwrite(other, 0)
        return need <= self._kv_cells

    def _overwrite(self, slot: Slot, keep: int) -> None:
        """Trim ``slot`` to its first ``keep`` cells; a prompt mostly lost that way goes to the prompt cache first."""
        if 2 * keep < len(slot.tokens):
            self._stash(slot)
        self._trim(slot, keep)

    def _stash(self, slot: Slot) -> None:
        if self._prompt_cache.touch(slot.tokens):
            return  # saved while the engine was idle
        llama, ctx = self._llama, self._ctx
        started = time.perf_counter()
        size = llama.llama_state_seq_get_size(ctx, slot.seq_id)
        if not self._prompt_cache.fits(size):
            return
        state = np.empty(size, np.uint8)  # not zeroed first: llama.cpp writes every byte
        if llama.llama_state_seq_get_data(ctx, _bytes_pointer(state), size, slot.seq_id) == size:
            self._prompt_cache.put(CachedPrompt(tuple(slot.tokens), state))
        self.stats.kv_saves += 1
        self.stats.kv_save_bytes += size
        self.stats.kv_save_seconds += time.perf_counter() - started

    def _restore(self, slot: Slot, entry: CachedPrompt, keep: int) -> int:
        """Copy ``entry`` into the empty ``slot`` and keep its first ``keep`` cells; the cells kept.

        The entry leaves the prompt cache when the slot keeps most of it (the slot stashes it again
        when it is overwritten); otherwise it stays, and the slot's copy is trimmed.
        """
        started = time.perf_counter()
        restored = self._llama.llama_state_seq_set_data(
            self._ctx, _bytes_pointer(entry.state), len(entry.state), slot.seq_id
        )
        self.stats.kv_restores += 1
        self.stats.kv_restore_bytes += len(entry.state)
        self.stats.kv_restore_seconds += time.perf_counter() - started
        if not restored:
            logger.warning("llama.cpp could not restore a cached prompt of %d tokens", len(entry.tokens))
            return 0  # prefilled instead
        slot.tokens = list(entry.tokens)
        if 2 * keep >= len(entry.tokens):
            self._prompt_cache.take(entry)
        self._trim(slot, keep)
        return keep

    def _trim(self, slot: Slot, keep: int) -> None:
        if len(slot.tokens) > keep:
            self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
            del slot.tokens[keep:]

    def _release(self, slot: Slot, keep_cache: bool) -> None:
        seq = slot.seq
        assert seq is not None
        if seq.sampler is not slot.sampler:  # an attached chain lives until the slot's next one
            self.samplers.free(seq.sampler)
        slot.seq, slot.last_used = None, time.monotonic()
        if not keep_cache:
            self._trim(slot, 0)

    def _step(self) -> None:
        started = time.perf_counter()
        self._idle_saved = False
        llama, batch = self._llama, self._batch
        outputs: list[tuple[Slot, int]] = []  # slots sampled from this step's logits, at batch index
        per_sequence: dict[int, int] = {}  # tokens of each seq id, in batch order
        n = 0

        def add(slot: Slot, token: int, logits: bool) -> None:
            nonlocal n
            per_sequence[slot.seq_id] = per_sequence.get(slot.seq_id, 0) + 1
            batch.token[n] = token
            batch.pos[n] = len(slot.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = logits
            slot.tokens.append(token)
            if logits:
                outputs.append((slot, n))
            n += 1

        running = self._running()
        # Generating sequences take one token each, prefilling ones prompt chunks in the room left;
        # laid out in seq id order, as llama.cpp's passes take runs of consecutive ids.
        room = self._n_batch - sum(1 for slot in running if slot.seq.prefilled == len(slot.seq.prompt))
        for slot in running:
            seq = slot.seq
            assert seq is not None
            if seq.prefilled == len(seq.prompt):
                add(slot, seq.next_token, True)
                continue
            chunk = min(room, len(seq.prompt) - seq.prefilled)
            room -= chunk
            for _ in range(chunk):
                seq.prefilled += 1
                add(slot, seq.prompt[seq.prefilled - 1], seq.prefilled == len(seq.prompt))
        if not n:
            return
        batch.n_tokens = n
        decoding = time.perf_counter()
        status = llama.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        llama.llama_synchronize(self._ctx)  # a GPU decodes asynchronously: its time counts here
        self._copy_sources.clear()
        self.stats.decode_seconds += time.perf_counter() - decoding
        self.stats.steps += 1
        self.stats.passes += stream_passes(per_sequence, self._n_batch) if self._streams else 1
        self.stats.batch_size = len(outputs)
        self.stats.peak_batch_size = max(self.stats.peak_batch_size, len(outputs))
        sequences = [slot.seq for slot, _ in outputs]
        for (slot, index), token in zip(outputs, self._sample_tokens(outputs), strict=True):
            top = slot.seq.sampling.logprobs
            self._sample(slot, token, () if top is None else (self._logprob(index, token, top),))
        now = time.monotonic()
        for seq in sequences:
            if seq.pending and now - seq.emitted_at >= seq.interval_s:
                self._flush(seq, now)
        self.stats.running = len(self._running())
        self._count_caches()
        self.stats.step_seconds += time.perf_counter() - started

    def _count_caches(self) -> None:
        self.stats.kv_cache_usage_perc = sum(len(s.tokens) for s in self._slots) / self._kv_cells
        self.stats.prompt_cache_entries = len(self._prompt_cache)
        self.stats.prompt_cache_bytes = self._prompt_cache.bytes

    def _sample_tokens(self, outputs: list[tuple[Slot, int]]) -> list[int]:
        """Each sequence's next token: read from the graph's sampling where it ran there, else from
        its sampler chain on the host, where several threads split a large batch.

        Chains are per sequence and the outputs are only read once the decode is synchronized
        (above) and reordered (the first ``llama_get_sampled_token_ith``, here: unlike reading
        logits, it is valid whether or not any output was sampled in the graph), so threads share
        nothing. A backend-sampled token is accepted here as ``llama_sampler_sample`` would (it
        also logs a debug line per token).
        """
        llama, ctx = self._llama, self._ctx
        sampled = llama.llama_get_sampled_token_ith
        tokens = [LLAMA_TOKEN_NULL] * len(outputs)
        if self._backend_sampling:
            for i, (slot, index) in enumerate(outputs):
                if slot.seq.on_backend and (token := sampled(ctx, index)) != LLAMA_TOKEN_NULL:
                    llama.llama_sampler_accept(slot.seq.sampler, token)
                    tokens[i] = token
        host = [i for i, token in enumerate(tokens) if token == LLAMA_TOKEN_NULL]
        self.stats.backend_sampled += len(outputs) - len(host)
        self.stats.host_sampled += len(host)
        groups = min(self._threads, len(host))
        if groups < 2:
            for i, token in zip(host, self._sample_group(outputs, host), strict=True):
                tokens[i] = token
            return tokens
        sampled(ctx, outputs[0][1])
        assert self._samplers_pool is not None
        pool = self._samplers_pool
        futures = [pool.submit(self._sample_group, outputs, host[g::groups]) for g in range(1, groups)]
        for g, group in enumerate([self._sample_group(outputs, host[0::groups]), *(f.result() for f in futures)]):
            for i, token in zip(host[g::groups], group, strict=True):
                tokens[i] = token
        return tokens

    def _sample_group(self, outputs: list[tuple[Slot, int]], which: list[int]) -> list[int]:
        sample, ctx = self._llama.llama_sampler_sample, self._ctx
        return [sample(outputs[i][0].seq.sampler, ctx, outputs[i][1]) for i in which]

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log-softmax over the raw logits at batch ``index``, and the ``top`` likeliest."""
        logits = np.ctypeslib.as_array(self._llama.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        peak = float(logits.max())
        norm = peak + float(np.log(np.exp(logits - peak).sum()))
        alternatives: tuple[tuple[bytes, float], ...] = ()
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(logits[ids])[::-1]]
            alternatives = tuple((self._pieces[i], float(logits[i]) - norm) for i in ids.tolist())
        return TokenLogprob(self._pieces[token], float(logits[token]) - norm, alternatives)

    def _sample(self, slot: Slot, token: int, logprobs: tuple[TokenLogprob, ...]) -> None:
        seq = slot.seq
        assert seq is not None
        if seq.cancelled:
            return  # dropped at the next step
        if token in self._eog:
            return self._finish(slot, "stop", "", ())
        seq.generated += 1
        text = seq.text.push(self._pieces[token])
        if seq.text.stopped:
            return self._finish(slot, "stop", text, logprobs)
        if seq.generated >= seq.sampling.max_tokens:
            return self._finish(slot, "length", text, logprobs)
        if text or logprobs:
            seq.pending.append(Delta(text, logprobs=logprobs))
        seq.next_token = token

    def _flush(self, seq: Sequence, now: float) -> None:
        if not seq.pending:
            return
        if seq.emitted_at < 0:
            self.stats.first_token_seconds += now - seq.submitted_at
        seq.emit(Delta.join(seq.pending))
        seq.pending, seq.emitted_at = [], now

    def _finish(self, slot: Slot, reason: str, text: str, logprobs: tuple[TokenLogprob, ...]) -> None:
        seq = slot.seq
        assert seq is not None
        usage = Usage(len(seq.prompt), seq.generated, seq.cached)
        seq.pending.append(Delta(text + seq.text.flush(), reason, usage, logprobs, seq.text.stop))
        self._flush(seq, time.monotonic())
        seq.emit(END)
        self._release(slot, keep_cache=True)

    def _token_bytes(self, token: int, buffer: ctypes.Array[ctypes.c_char]) -> bytes:
        n = self._llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if n < 0:  # longer than the buffer
            buffer = ctypes.create_string_buffer(-n)
            n = self._llama.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def _end_all(self, error: BaseException | None) -> None:
        """End every sequence: with ``error``, or (stopping) without a final delta."""
        with self._wake:
            waiting = [*self._waiting, *self._submitted]
            self._waiting, self._submitted = deque(), deque()
        for seq in waiting:
            self.samplers.free(seq.sampler)
        for slot in self._slots:
            if slot.seq is not None:
                self._flush(slot.seq, time.monotonic())  # what it generated reaches the caller before the error
                waiting.append(slot.seq)
                self._release(slot, keep_cache=False)
        for seq in waiting:
            if error is not None:
                seq.emit(error)
            seq.emit(END)
