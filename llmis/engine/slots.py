"""One sequence slot of a generation scheduler, and its prompt cache rule.

A slot holds one sequence's KV cells in the model's context (``seq_id``) and, while a job runs
in it, that job's sampler and text stream. After the job the tokens stay cached: the next
prompt that shares a prefix with them reuses that many cells (:meth:`Slot.reusable`), and a
prompt equal to the last one samples from the saved logits with no decode at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmis.engine.jobs import Job
from llmis.engine.logprobs import TokenLogprob
from llmis.engine.sampling import Sampler, TextStream

__all__ = ["Slot", "common_prefix"]


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV the sequence holds
    canonical: int = 0  # tokens[:canonical] were evaluated in whole aligned prompt chunks
    job: Job | None = None
    sampler: Sampler | None = None
    out: TextStream | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None  # sampled, to be decoded in the next step
    logits_at: int = -1  # batch index of this sequence's logits after a decode
    cached: int = 0  # prompt tokens reused from the slot's previous sequence
    last_used: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent in a Delta
    # the logits after the last prompt token of the slot's previous job: a request for the
    # same prompt samples from them without a decode (``prompt_canonical``: that prompt was
    # evaluated in aligned chunks, as a fresh context evaluates it, so seeds may use them)
    prompt_logits: np.ndarray[Any, Any] | None = None
    prompt_len: int = 0
    prompt_canonical: bool = False
    evaluating_canonically: bool = False  # this job's prompt is being evaluated canonically
    from_logits: bool = False  # this job samples its first token from ``prompt_logits``

    def reusable(self, prompt: Sequence[int], seeded: bool, chunk: int) -> int:
        """How many of ``prompt``'s tokens to take from the slot's KV cache.

        All of them when the slot saved the logits after exactly this prompt (for a seeded
        request, only logits of a canonical evaluation); otherwise at least the last token
        is evaluated again, to get its logits.
        """
        shared = common_prefix(self.tokens, prompt)
        if (
            shared == len(prompt) == self.prompt_len
            and self.prompt_logits is not None
            and (self.prompt_canonical or not seeded)
        ):
            return shared
        shared = min(shared, len(prompt) - 1)
        if not seeded:
            return shared
        # only whole aligned chunks, themselves evaluated as aligned chunks: the same KV a
        # fresh evaluation makes, so a seed gives the same output with or without the cache
        return min(shared // chunk * chunk, self.canonical)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
