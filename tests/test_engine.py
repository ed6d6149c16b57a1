"""The model wrapper and the per-sequence pieces against the real SmolLM2 model, in process.

Generation itself runs in the scheduler (tests/test_scheduler.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmis.engine.llama import Engine
from llmis.engine.sampling import SamplingParams, TextStream, _stop_holdback
from llmis.errors import APIError
from tests.conftest import REPO, smollm_path

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(smollm_path(), n_ctx=512, threads=2)
    yield eng
    eng.close()


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("hello wor", ("world",), 3), ("abc", ("x",), 0), ("a<|", ("<|end|>",), 2), ("", ("z",), 0)],
)
def test_stop_holdback(text: str, stops: tuple[str, ...], held: int) -> None:
    assert _stop_holdback(text, stops) == held


def test_text_stream_cuts_at_a_stop_string_and_counts_tokens(engine: Engine) -> None:
    tokens = engine.tokenize(" one, two, three, four", add_bos=False)
    out = TextStream(engine.vocab, SamplingParams(max_tokens=100, stop=(" three",)))
    steps = [s for s in (out.push(t) for t in tokens) if s is not None]
    assert "".join(s.text for s in steps) == " one, two,"
    assert steps[-1].finish_reason == "stop"
    limited = TextStream(engine.vocab, SamplingParams(max_tokens=2))
    last = [s for s in (limited.push(t) for t in tokens[:2]) if s is not None][-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 2)
    assert TextStream(engine.vocab, SamplingParams(max_tokens=9)).push(EOS) is not None


def test_the_model_has_no_context_of_its_own(engine: Engine) -> None:
    assert engine.generates and not engine.embedding
    assert engine.has_chat_template and engine.chat_template_source == "gguf"


def test_grammar_check(engine: Engine) -> None:
    engine.check_grammar('root ::= "yes" | "no"')
    with pytest.raises(APIError, match="could not be parsed"):
        engine.check_grammar("root ::= (")


def test_context_arithmetic(engine: Engine) -> None:
    assert engine.check_context(100, None, "prompt") == engine.n_ctx - 100
    with pytest.raises(Exception, match=r"512 tokens.*requested 612 tokens \(100 in the prompt"):
        engine.check_context(100, 512, "prompt")


@pytest.mark.parametrize(
    ("env", "spincount"),
    [({}, "1000"), ({"GOMP_SPINCOUNT": "300000"}, "300000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_openmp_threads_spin_briefly_unless_the_environment_says(
    env: dict[str, str], spincount: str | None
) -> None:
    """llmis makes llama.cpp's OpenMP threads spin briefly before they sleep
    (``llmis/__init__.py``); a value of the user's own, either key, wins. Read back from
    libgomp itself (OMP_DISPLAY_ENV)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run(
        [sys.executable, "-c", "import llmis.engine.llama"],
        env={**base, **env, "OMP_DISPLAY_ENV": "verbose", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    reported = re.search(r"GOMP_SPINCOUNT = '(\d+)'", done.stderr)
    assert reported is not None, done.stderr[-2000:]
    if spincount is None:  # ACTIVE: libgomp's long spin, not llmis's
        assert int(reported.group(1)) > 300000
    else:
        assert reported.group(1) == spincount
