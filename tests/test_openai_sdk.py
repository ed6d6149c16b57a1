"""The official openai SDK against a real llmis server on a free port."""

from __future__ import annotations

import json

import openai
import pytest
from llama_cpp import Llama

from tests.conftest import RunningServer, bad_chat_param, smollm_path

EOS_BAN = {"2": -100}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data if not (m.model_extra or {}).get("preset")]
    assert ids == ["smollm2", "smollm2-q1"]  # then the task presets (tests/test_presets.py)
    assert all(m.object == "model" and m.owned_by == "llmis" for m in models.data)
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=8,
        temperature=0,
        extra_body={"logit_bias": EOS_BAN},
    )
    assert out.object == "chat.completion"
    assert out.model == "smollm2"
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 10
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_completion_natural_stop(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=200,
        temperature=0,
    )
    assert out.choices[0].finish_reason == "stop"
    assert out.usage is not None and 0 < out.usage.completion_tokens < 200


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="smollm2",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=12,
        temperature=0,
    )
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )  # type: ignore[call-overload]
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert len({c.id for c in chunks}) == 1


def test_completion_and_stream(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model="smollm2", prompt="The sky is", max_tokens=6, temperature=0, logit_bias=EOS_BAN
    )
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    chunks = list(
        client.completions.create(
            model="smollm2",
            prompt="The sky is",
            max_tokens=6,
            temperature=0,
            logit_bias=EOS_BAN,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_completion_batch_has_one_choice_per_prompt(client: openai.OpenAI) -> None:
    prompts = ["One, two,", "Red, green,", "Monday, Tuesday,"]
    out = client.completions.create(
        model="smollm2", prompt=prompts, max_tokens=4, temperature=0, logit_bias=EOS_BAN
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [
        client.completions.create(
            model="smollm2", prompt=p, max_tokens=4, temperature=0, logit_bias=EOS_BAN
        )
        .choices[0]
        .text
        for p in prompts
    ]
    assert [c.text for c in out.choices] == singles
    assert out.usage is not None and out.usage.completion_tokens == 12


def test_stop_sequences(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="smollm2", prompt="1, 2, 3,", max_tokens=12, temperature=0, logit_bias=EOS_BAN
    )
    text = base.choices[0].text
    stop = text.strip()[:2]
    cut = client.completions.create(
        model="smollm2",
        prompt="1, 2, 3,",
        max_tokens=12,
        temperature=0,
        logit_bias=EOS_BAN,
        stop=[stop, "zzz"],
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        return (
            client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": "Write a word."}],
                max_tokens=10,
                temperature=1.0,
                seed=seed,
            )
            .choices[0]
            .message.content
        )

    assert sample(11) == sample(11)


def test_logit_bias_forces_a_token(client: openai.OpenAI) -> None:
    vocab = Llama(str(smollm_path()), vocab_only=True, verbose=False)
    [token] = vocab.tokenize(b"=", add_bos=False)
    out = client.completions.create(
        model="smollm2", prompt="Hello", max_tokens=3, temperature=0, logit_bias={str(token): 100}
    )
    assert out.choices[0].text == "==="


def test_response_format_json_schema_is_enforced(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    }
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Pick a colour of the sky."}],
        max_tokens=40,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "pick", "schema": schema, "strict": True},
        },
    )
    content = out.choices[0].message.content
    assert content is not None
    assert json.loads(content)["colour"] in {"red", "green", "blue"}
    assert out.choices[0].finish_reason == "stop"  # the grammar completed, then end of text


def test_response_format_json_object_streams_json(client: openai.OpenAI) -> None:
    chunks = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give a JSON object describing a cat."}],
        max_tokens=24,
        temperature=0,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.lstrip().startswith("{")  # 24 tokens may cut it, but it is JSON from the start


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_unsupported_or_bad_structured_output_requests(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    assert bad_chat_param(client, extra) == param
