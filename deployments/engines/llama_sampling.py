"""A request's llama.cpp sampler chain: bias, grammar, penalties, truncation, temperature, draw.

Built on the event loop when a request arrives, so what only the model can check (token ids,
whether a JSON schema becomes a grammar) is a 400 before the request queues; the scheduler
then owns the chain and frees it when the sequence leaves.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

from deployments.engines.base import JsonOutput, SamplingParams
from deployments.errors import InvalidRequest

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed" (LLAMA_DEFAULT_SEED), again at each reset
# The converter's string character admits control characters, which JSON forbids unescaped;
# llama.cpp's own converter excludes them the same way.
_ANY_CHAR, _JSON_CHAR = r'char ::= [^"\\]', r'char ::= [^"\\\x7F\x00-\x1F]'


def json_grammar(output: JsonOutput) -> str:
    """The GBNF grammar of ``output`` (llama-cpp-python's port of llama.cpp's converter: its
    whitespace is one optional space, so a random-weight model cannot run away in blanks)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(json.dumps(output.json_schema or ANY_OBJECT))
    except Exception as exc:  # the converter signals what it cannot express with asserts and errors
        why = str(exc) or type(exc).__name__
        raise InvalidRequest(
            f"response_format: the JSON schema uses a feature llama.cpp's grammar cannot express ({why})"
        ) from None
    return grammar.replace(_ANY_CHAR, _JSON_CHAR)


class Samplers:
    """Builds sampler chains for one model (its vocabulary and end-of-generation tokens)."""

    def __init__(self, llama: Any, vocab: Any, eog: frozenset[int]) -> None:
        self._llama = llama
        self._vocab = vocab
        self._n_vocab = llama.llama_vocab_n_tokens(vocab)
        self._eog = sorted(eog)

    @staticmethod
    def offloadable(s: SamplingParams) -> bool:
        """Whether llama.cpp can run ``s``'s whole chain inside the decode graph (backend sampling).

        The vendored llama.cpp offloads logit bias, penalties (with one output per sequence a
        step, as the scheduler decodes), top-k, top-p, min-p, temperature, greedy and dist. A
        grammar runs on the host only, and logprobs need the raw logits, which llama.cpp does not
        return for a step whose outputs were all sampled in the graph.
        """
        return s.json_output is None and s.logprobs is None

    @staticmethod
    def key(s: SamplingParams, seed: int) -> Hashable:
        """What tells chains apart: two with equal keys sample alike once reset (a random seed
        is drawn anew then), so an attached chain can serve the next such request as it is."""
        penalties = (s.max_tokens, s.repetition_penalty, s.frequency_penalty, s.presence_penalty)
        drawn = (s.top_k, s.top_p, s.min_p, s.temperature, seed) if s.temperature > 0 else None
        return (s.logit_bias, s.ignore_eos, s.json_output, penalties if s.penalized else None, drawn)

    def chain(self, s: SamplingParams, seed: int) -> Any:
        """The chain in llama.cpp's own order; raises :class:`InvalidRequest` for what the model rejects."""
        llama = self._llama
        biases = dict(s.logit_bias)
        if unknown := sorted(t for t in biases if not 0 <= t < self._n_vocab):
            raise InvalidRequest(f"logit_bias: token ids {unknown} are not in the vocabulary (0..{self._n_vocab - 1})")
        if s.ignore_eos:
            biases.update((t, float("-inf")) for t in self._eog)
        grammar = json_grammar(s.json_output).encode() if s.json_output is not None else None

        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            llama.llama_sampler_chain_add(chain, sampler)

        if biases:
            pairs = (llama.llama_logit_bias * len(biases))(*biases.items())
            add(llama.llama_sampler_init_logit_bias(self._n_vocab, len(biases), pairs))
        if grammar is not None:  # before any truncation: top-k alone might keep no valid token
            sampler = llama.llama_sampler_init_grammar(self._vocab, grammar, b"root")
            if not sampler:
                llama.llama_sampler_free(chain)
                raise InvalidRequest("response_format: llama.cpp could not compile the schema's grammar")
            add(sampler)
        if s.penalized:  # over the generated tokens (the chain accepts only sampled ones)
            add(
                llama.llama_sampler_init_penalties(
                    self._n_vocab, s.max_tokens, s.repetition_penalty, s.frequency_penalty, s.presence_penalty
                )
            )
        if s.temperature <= 0:
            add(llama.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            add(llama.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            add(llama.llama_sampler_init_top_p(s.top_p, 1))
        if s.min_p > 0.0:
            add(llama.llama_sampler_init_min_p(s.min_p, 1))
        add(llama.llama_sampler_init_temp(s.temperature))
        add(llama.llama_sampler_init_dist(seed))
        return chain

    def free(self, chain: Any) -> None:
        self._llama.llama_sampler_free(chain)
