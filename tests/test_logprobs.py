"""logprobs on chat (streamed and not) and on completions, through the openai SDK."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import RunningServer

ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_chat_logprobs_greedy(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert out.usage is not None and len(entries) == out.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
        top = entry.top_logprobs
        assert len(top) == 5
        values = [t.logprob for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        # greedy: the chosen token is the most likely one
        assert top[0].token == entry.token and top[0].logprob == pytest.approx(entry.logprob)


def test_chat_logprobs_without_top(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=ASK,
        max_tokens=4,
        temperature=0,
        logprobs=True,  # type: ignore[arg-type]
    )
    entries = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert entries and all(e.top_logprobs == [] and e.logprob <= 0 for e in entries)
    plain = client.chat.completions.create(
        model="smollm2",
        messages=ASK,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_match(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="smollm2", messages=ASK, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    expected = whole.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected])


def test_completion_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="smollm2", prompt="The sky is", max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == out.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0
        assert len(top) <= 3 and all(v <= 0 for v in top.values())
        assert max(top.values()) == pytest.approx(value)  # greedy picks the best
        assert token in top


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_logprobs_are_400(client: openai.OpenAI, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="smollm2",
            messages=ASK,
            max_tokens=2,
            extra_body=extra,  # type: ignore[arg-type]
        )
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param
