"""Task presets on every API family: OpenAI ``/v1/completions``, Ollama ``/api/chat`` and
``/api/generate``, Anthropic ``/v1/messages``, each plain and streamed, through the real
``openai``, ``ollama`` and ``anthropic`` clients on the shared SmolLM2 ``server`` (the
built-in presets run on its first chat model, ``smollm2``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import anthropic
import ollama
import openai
import pytest

from tests.conftest import RunningServer
from tests.test_presets import task_of, topics

LABELS = ["cooking", "finance", "pets", "science"]
LENGTH = 8


def text_of(row: int = 0) -> str:
    return topics()[row]["text"]


def check_classified(text: str, task: dict[str, Any]) -> None:
    """One of the labels, and every label's probability (a softmax over them)."""
    assert text in LABELS, text
    assert task["preset"] == "classify" and task["label"] == text
    probabilities = task["probabilities"]
    assert list(probabilities) == LABELS and abs(sum(probabilities.values()) - 1) < 1e-6
    assert all(0 < p < 1 for p in probabilities.values())


# ----- OpenAI /v1/completions -----


@pytest.fixture
def openai_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_completions_classify(openai_client: openai.OpenAI) -> None:
    reply = openai_client.completions.create(
        model="classify", prompt=text_of(), extra_body={"labels": LABELS}
    )
    assert reply.model == "classify@smollm2"
    check_classified(reply.choices[0].text, task_of(reply))
    chunks = list(
        openai_client.completions.create(
            model="classify", prompt=text_of(), stream=True, extra_body={"labels": LABELS}
        )
    )
    first = task_of(chunks[0])
    assert first == {"preset": "classify", "labels": LABELS, "multi_label": False}
    text = "".join(c.choices[0].text for c in chunks)
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    check_classified(text, task_of(last))
    assert text == reply.choices[0].text  # the grammar and temperature 0: the same label


def test_completions_summarize(openai_client: openai.OpenAI) -> None:
    text = text_of(1) * 4
    reply = openai_client.completions.create(
        model="summarize", prompt=text, extra_body={"length": LENGTH}
    )
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= LENGTH
    assert reply.choices[0].text.strip()
    assert task_of(reply) == {"preset": "summarize", "length": LENGTH}
    chunks = list(
        openai_client.completions.create(
            model="summarize@smollm2",
            prompt=text,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"length": LENGTH},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= LENGTH
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()


def test_completions_bad_preset_params(openai_client: openai.OpenAI) -> None:
    for extra, param in (
        ({"labels": ["a", "a"]}, "labels"),
        ({"labels": LABELS, "prompt": ["one", "two"]}, "prompt"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            openai_client.completions.create(model="classify", prompt="x", extra_body=extra)
        body = bad.value.body
        assert isinstance(body, dict) and body["param"] == param
        assert body["type"] == "invalid_request_error" and body["message"]


# ----- Ollama /api/chat and /api/generate -----


@pytest.fixture
def ollama_client(server: RunningServer) -> ollama.Client:
    return ollama.Client(host=server.url)


def ollama_lines(server: RunningServer, path: str, body: dict[str, Any]) -> list[Any]:
    """A streamed Ollama reply, one object a line (read raw: the ``ollama`` client's models
    drop fields it does not know, such as ``task``)."""
    request = urllib.request.Request(
        server.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return [json.loads(line) for line in resp.read().decode().splitlines()]


def test_ollama_chat_classify(ollama_client: ollama.Client, server: RunningServer) -> None:
    messages = [{"role": "user", "content": text_of()}]
    # the ollama client sends only its own fields: task fields go in ``options``
    whole = ollama_client.chat(
        model="classify", messages=messages, options={"labels": LABELS}, stream=False
    )
    assert whole.done and whole.model == "classify@smollm2"
    assert whole.message.content in LABELS
    parts = list(
        ollama_client.chat(
            model="classify", messages=messages, options={"labels": LABELS}, stream=True
        )
    )
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    # the task result is a top-level field of the last object; task fields top-level work too
    status, body = server.post_json(
        "/api/chat",
        {"model": "classify", "messages": messages, "labels": LABELS, "stream": False},
    )
    assert status == 200
    check_classified(body["message"]["content"], body["task"])
    lines = ollama_lines(
        server,
        "/api/chat",
        {"model": "classify", "messages": messages, "options": {"labels": LABELS}},
    )
    assert lines[-1]["done"] is True and all("task" not in line for line in lines[:-1])
    check_classified("".join(line["message"]["content"] for line in lines), lines[-1]["task"])


def test_ollama_generate_summarize_and_classify(
    ollama_client: ollama.Client, server: RunningServer
) -> None:
    text = text_of(1) * 4
    whole = ollama_client.generate(model="summarize", prompt=text, options={"length": LENGTH})
    assert whole.done and whole.eval_count is not None and 1 <= whole.eval_count <= LENGTH
    assert whole.response.strip()
    parts = list(
        ollama_client.generate(
            model="summarize", prompt=text, options={"length": LENGTH}, stream=True
        )
    )
    last = parts[-1]
    assert last.done and last.eval_count is not None and 1 <= last.eval_count <= LENGTH
    assert "".join(p.response for p in parts).strip()
    lines = ollama_lines(
        server, "/api/generate", {"model": "summarize", "prompt": text, "length": LENGTH}
    )
    assert lines[-1]["task"] == {"preset": "summarize", "length": LENGTH}
    assert 1 <= lines[-1]["eval_count"] <= LENGTH
    labelled = ollama_client.generate(
        model="classify", prompt=text_of(), options={"labels": LABELS}
    )
    assert labelled.response in LABELS
    status, body = server.post_json(
        "/api/generate",
        {"model": "classify", "prompt": text_of(), "options": {"labels": LABELS}, "stream": False},
    )
    assert status == 200 and body["model"] == "classify@smollm2"
    check_classified(body["response"], body["task"])
    assert body["response"] == labelled.response


def test_ollama_bad_preset_params(ollama_client: ollama.Client, server: RunningServer) -> None:
    with pytest.raises(ollama.ResponseError) as bad:
        ollama_client.chat(
            model="classify", messages=[{"role": "user", "content": "x"}], options={"labels": []}
        )
    assert bad.value.status_code == 400 and "labels" in bad.value.error
    status, body = server.post_json(
        "/api/generate", {"model": "summarize", "prompt": "x", "length": 0}
    )
    assert status == 400 and set(body) == {"error"} and "length" in body["error"]
    with pytest.raises(ollama.ResponseError) as raw:
        ollama_client.generate(model="summarize", prompt="x", raw=True)
    assert raw.value.status_code == 400 and "raw" in raw.value.error


def test_ollama_show_and_tags(ollama_client: ollama.Client, server: RunningServer) -> None:
    assert ollama_client.show("smollm2").capabilities == ["completion", "tools"]
    assert ollama_client.show("classify").capabilities == ["completion"]
    status, shown = server.post_json("/api/show", {"model": "summarize@smollm2-q1"})
    assert status == 200
    assert shown["preset"] == {"name": "summarize", "task": "summarize", "model": "smollm2-q1"}
    status, missing = server.post_json("/api/show", {"model": "summarize@nosuch"})
    assert status == 404 and set(missing) == {"error"}
    names = {m.model for m in ollama_client.list().models}
    assert {"smollm2", "summarize", "classify", "answer", "extract"} <= names


# ----- Anthropic /v1/messages -----


@pytest.fixture
def anthropic_client(server: RunningServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def test_messages_classify(anthropic_client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": text_of()}]
    reply = anthropic_client.messages.create(
        model="classify", max_tokens=32, messages=messages, extra_body={"labels": LABELS}
    )
    assert reply.model == "classify@smollm2" and reply.stop_reason == "end_turn"
    assert len(reply.content) == 1 and reply.content[0].type == "text"
    check_classified(reply.content[0].text, task_of(reply))
    events = list(
        anthropic_client.messages.create(
            model="classify",
            max_tokens=32,
            messages=messages,
            stream=True,
            extra_body={"labels": LABELS},
        )
    )
    start = events[0]
    assert start.type == "message_start"
    assert task_of(start.message) == {"preset": "classify", "labels": LABELS, "multi_label": False}
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    delta = next(e for e in events if e.type == "message_delta")
    check_classified(text, task_of(delta))


def test_messages_summarize(anthropic_client: anthropic.Anthropic) -> None:
    messages: list[Any] = [{"role": "user", "content": text_of(1) * 4}]
    reply = anthropic_client.messages.create(
        model="summarize", max_tokens=200, messages=messages, extra_body={"length": LENGTH}
    )
    assert 1 <= reply.usage.output_tokens <= LENGTH and reply.content[0].text.strip()
    assert task_of(reply) == {"preset": "summarize", "length": LENGTH}
    with anthropic_client.messages.stream(
        model="summarize", max_tokens=200, messages=messages, extra_body={"length": LENGTH}
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and 1 <= final.usage.output_tokens <= LENGTH


def test_messages_bad_preset_params(anthropic_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        anthropic_client.messages.create(
            model="extract", max_tokens=32, messages=[{"role": "user", "content": "x"}]
        )
    body = bad.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "schema" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as labels:
        anthropic_client.messages.create(
            model="classify",
            max_tokens=32,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"labels": "not a list"},
        )
    assert "labels" in labels.value.body["error"]["message"]  # type: ignore[index]


# ----- every family plans the same request -----


def test_every_family_gives_chats_answer(
    openai_client: openai.OpenAI,
    ollama_client: ollama.Client,
    anthropic_client: anthropic.Anthropic,
    server: RunningServer,
) -> None:
    """The same text to ``classify`` on each API: the same prompt, so the same label and the
    same probabilities as on /v1/chat/completions (and logprobs work on completions)."""
    for row in (0, 5, 10):
        text = text_of(row)
        chat = openai_client.chat.completions.create(
            model="classify",
            messages=[{"role": "user", "content": text}],
            extra_body={"labels": LABELS},
        )
        expected = task_of(chat)
        completion = openai_client.completions.create(
            model="classify", prompt=text, logprobs=2, extra_body={"labels": LABELS}
        )
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens is not None
        assert "".join(logprobs.tokens) == completion.choices[0].text
        status, generated = server.post_json(
            "/api/generate",
            {"model": "classify", "prompt": text, "labels": LABELS, "stream": False},
        )
        assert status == 200
        message = anthropic_client.messages.create(
            model="classify",
            max_tokens=32,
            messages=[{"role": "user", "content": text}],
            extra_body={"labels": LABELS},
        )
        for task in (task_of(completion), generated["task"], task_of(message)):
            assert task["label"] == expected["label"]
            for label in LABELS:
                assert abs(task["probabilities"][label] - expected["probabilities"][label]) < 1e-4
