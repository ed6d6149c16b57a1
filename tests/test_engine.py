"""The generation loop against the real SmolLM2 model, in process (no server)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from llmis.engine import Engine, SamplingParams, _stop_holdback
from tests.conftest import smollm_path

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(smollm_path(), n_ctx=512, threads=2)
    yield eng
    eng.close()


def run(engine: Engine, prompt: str, **kw: object) -> tuple[str, str | None, int]:
    params = SamplingParams(**{"max_tokens": 16, "temperature": 0.0, **kw})  # type: ignore[arg-type]
    steps = list(engine.generate(engine.text_prompt(prompt), params, threading.Event()))
    return "".join(s.text for s in steps), steps[-1].finish_reason, steps[-1].completion_tokens


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("hello wor", ("world",), 3), ("abc", ("x",), 0), ("a<|", ("<|end|>",), 2), ("", ("z",), 0)],
)
def test_stop_holdback(text: str, stops: tuple[str, ...], held: int) -> None:
    assert _stop_holdback(text, stops) == held


def test_greedy_is_deterministic_and_counts_tokens(engine: Engine) -> None:
    first = run(engine, "The capital of France is", max_tokens=12, logit_bias={EOS: -100.0})
    second = run(engine, "The capital of France is", max_tokens=12, logit_bias={EOS: -100.0})
    assert first == second
    assert first[1] == "length"
    assert first[2] == 12


def test_stop_string_cuts_text_and_reports_stop(engine: Engine) -> None:
    text, _, _ = run(engine, "Count: 1, 2, 3, 4,", max_tokens=24, logit_bias={EOS: -100.0})
    assert len(text) > 4
    stop = text[2:4]
    cut, reason, _ = run(
        engine, "Count: 1, 2, 3, 4,", max_tokens=24, logit_bias={EOS: -100.0}, stop=(stop,)
    )
    assert reason == "stop"
    assert cut == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(engine: Engine) -> None:
    a = run(engine, "Once upon a time", temperature=1.0, seed=7, max_tokens=16)
    b = run(engine, "Once upon a time", temperature=1.0, seed=7, max_tokens=16)
    assert a == b


def test_cancel_stops_between_tokens(engine: Engine) -> None:
    cancel = threading.Event()
    params = SamplingParams(max_tokens=200, temperature=0.0, logit_bias={EOS: -100.0})
    seen = 0
    for _ in engine.generate(engine.text_prompt("Tell me a story"), params, cancel):
        seen += 1
        if seen == 3:
            cancel.set()
    assert seen == 3


def test_context_arithmetic(engine: Engine) -> None:
    assert engine.check_context(100, None, "prompt") == engine.n_ctx - 100
    with pytest.raises(Exception, match=r"512 tokens.*requested 612 tokens \(100 in the prompt"):
        engine.check_context(100, 512, "prompt")
