"""Per-token cost of ``llmis.engine.logprobs.token_logprob`` on SmolLM2's logits row.

``python -m scripts.bench_logprobs``: decodes a short prompt once, then times the logprob of
one position (log-softmax over the vocabulary, plus the top-k alternatives) for several k.
"""

from __future__ import annotations

import time

import llama_cpp
import numpy as np

from llmis.engine.llama import Engine
from llmis.engine.logprobs import token_logprob
from tests.conftest import smollm_path


def main() -> None:
    engine = Engine(smollm_path(), n_ctx=512)
    gen = engine.create_context(1)
    tokens = engine.tokenize("The sky is")
    batch = llama_cpp.llama_batch_init(64, 0, 1)
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)
    if llama_cpp.llama_decode(gen.ctx, batch) != 0:
        raise SystemExit("decode failed")
    index = len(tokens) - 1
    logits = llama_cpp.llama_get_logits_ith(gen.ctx, index)
    row = np.ctypeslib.as_array(logits, shape=(engine.n_vocab,))
    for top in (0, 5, 20):
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            token_logprob(row, engine.vocab, 42, top)
        per = (time.perf_counter() - start) / n * 1e6
        print(f"top_logprobs={top}: {per:.0f} us/token (n_vocab={engine.n_vocab})")
    llama_cpp.llama_batch_free(batch)
    gen.close()
    engine.close()


if __name__ == "__main__":
    main()
