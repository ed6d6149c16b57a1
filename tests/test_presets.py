"""Task presets on a real server (SmolLM2 for text, MiniLM + ``llmis index`` of
data/topics.csv for ``answer``), through the openai SDK, raw SSE and the WebSocket."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import SMOLLM_RESOURCE, RunningServer
from tests.test_embeddings import MODELS_DIR, minilm_path
from tests.test_search import QUERIES, TOPICS, run_index

PRESET_CONFIG = """
[[presets]]
name = "pirate"
system = "You are a pirate. Answer in one short sentence."
temperature = 0.0
max_tokens = 12

[[presets]]
name = "person"
description = "a person's name and age as JSON"
max_tokens = 40

[presets.schema]
type = "object"
required = ["name", "age"]
[presets.schema.properties.name]
type = "string"
[presets.schema.properties.age]
type = "integer"
"""


def presets_config(indexes: Path) -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = 2
models_dir = "{MODELS_DIR}"
indexes_dir = "{indexes}"

[[models]]
name = "smollm2"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 2048

[[models]]
name = "minilm"
path = ".converted/{minilm_path().name}"
n_ctx = 512
embedding = true
{PRESET_CONFIG}
"""


@pytest.fixture(scope="module")
def preset_server(
    tmp_path_factory: pytest.TempPathFactory, start_server: Callable[..., RunningServer]
) -> RunningServer:
    workdir = tmp_path_factory.mktemp("presets")
    (workdir / "llmis.toml").write_text(presets_config(workdir / "indexes"))
    done = run_index(workdir, TOPICS, "topics", "--id-column", "id", "--model", "minilm")
    assert done.returncode == 0, done.stderr
    return start_server((workdir / "llmis.toml").read_text())


@pytest.fixture
def client(preset_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=preset_server.base_url, api_key="unused", max_retries=0)


def task_of(reply: Any) -> dict[str, Any]:
    extra = reply.model_extra or {}
    assert "task" in extra, extra
    return extra["task"]  # type: ignore[no-any-return]


def topics() -> list[dict[str, str]]:
    with TOPICS.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_presets_are_listed_as_models(preset_server: RunningServer) -> None:
    status, body = preset_server.get_json("/v1/models")
    assert status == 200
    presets = {m["id"]: m for m in body["data"] if m.get("preset")}  # type: ignore[index]
    assert set(presets) == {"summarize", "classify", "answer", "extract", "pirate", "person"}
    assert presets["classify"]["task"] == "classify" and presets["pirate"]["model"] == "smollm2"
    status, one = preset_server.get_json("/v1/models/summarize")
    assert status == 200 and one["preset"] is True  # type: ignore[index]


@pytest.mark.parametrize("length", [5, 20])
def test_summarize_never_exceeds_its_length(client: openai.OpenAI, length: int) -> None:
    text = topics()[0]["text"] * 4
    reply = client.chat.completions.create(
        model="summarize",
        messages=[{"role": "user", "content": text}],
        extra_body={"length": length},
    )
    assert reply.model == "summarize@smollm2"
    assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= length
    assert (reply.choices[0].message.content or "").strip()
    assert task_of(reply) == {"preset": "summarize", "length": length}
    # a smaller max_tokens wins; the model can be named after the '@'
    capped = client.chat.completions.create(
        model="summarize@smollm2",
        messages=[{"role": "user", "content": text}],
        max_tokens=3,
        extra_body={"length": length},
    )
    assert capped.usage is not None and capped.usage.completion_tokens <= 3


def test_classify_gives_one_label_and_probabilities(client: openai.OpenAI) -> None:
    labels = ["cooking", "finance", "pets", "science"]
    seen = []
    for row in topics()[:3] + topics()[-3:]:
        reply = client.chat.completions.create(
            model="classify",
            messages=[{"role": "user", "content": row["text"]}],
            extra_body={"labels": labels},
        )
        content = reply.choices[0].message.content
        task = task_of(reply)
        assert content in labels and task["label"] == content
        probs = task["probabilities"]
        assert list(probs) == labels and abs(sum(probs.values()) - 1) < 1e-6
        assert all(0 < p < 1 for p in probs.values())
        seen.append(tuple(round(p, 6) for p in probs.values()))
    assert len(set(seen)) == len(seen)  # computed per text from the logits, not fixed


def test_classify_multi_label_and_streaming(preset_server: RunningServer) -> None:
    labels = ["cooking", "health", "travel"]
    body = {
        "model": "classify",
        "messages": [{"role": "user", "content": "Healthy meals to cook on a trip abroad."}],
        "labels": labels,
        "multi_label": True,
        "stream": True,
    }
    import urllib.request

    request = urllib.request.Request(
        preset_server.url + "/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        raw = resp.read().decode()
    events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert raw.endswith("data: [DONE]\n\n")
    assert events[0]["task"] == {"preset": "classify", "labels": labels, "multi_label": True}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    chosen = json.loads(text)
    assert chosen and set(chosen) <= set(labels)
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["task"]["chosen"] == list(dict.fromkeys(chosen))
    assert set(last["task"]["probabilities"]) == set(labels)


def test_answer_retrieves_with_search_and_cites_row_ids(
    client: openai.OpenAI, preset_server: RunningServer
) -> None:
    question = "my sourdough loaf came out flat and dense"
    reply = client.chat.completions.create(
        model="answer",
        messages=[{"role": "user", "content": question}],
        max_tokens=40,
        extra_body={"index": "topics", "rows": 3},
    )
    task = task_of(reply)
    status, searched = preset_server.post_json(
        "/v1/search", {"index": "topics", "query": question, "top_k": 3}
    )
    assert status == 200
    retrieved = [row["id"] for row in task["retrieved"]]
    assert retrieved == [hit["id"] for hit in searched["data"]]  # type: ignore[union-attr]
    assert "bread-baking" in retrieved
    content = reply.choices[0].message.content or ""
    assert task["citations"] and set(task["citations"]) <= set(retrieved)
    assert content.startswith(f"[{task['citations'][0]}]")


def test_answer_retrieval_hit_rate_on_the_labelled_queries(client: openai.OpenAI) -> None:
    """Every query of data/queries.csv through the full path (chat request to 'answer'):
    how often the expected topic is among the retrieved rows (the README reports it)."""
    with QUERIES.open(newline="") as handle:
        queries = list(csv.DictReader(handle))
    hits = cited = 0
    for row in queries:
        reply = client.chat.completions.create(
            model="answer",
            messages=[{"role": "user", "content": row["query"]}],
            max_tokens=12,
        )
        task = task_of(reply)
        hits += row["expected_id"] in [r["id"] for r in task["retrieved"]]
        cited += row["expected_id"] in task["citations"]
    rate = hits / len(queries)
    print(f"answer retrieval hit-rate@3: {hits}/{len(queries)} = {rate:.2f}; cited {cited}")
    assert rate >= 0.9


def test_extract_follows_the_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["city", "year"],
    }
    reply = client.chat.completions.create(
        model="extract",
        messages=[{"role": "user", "content": "In 1998 we moved to Lisbon."}],
        max_tokens=120,
        temperature=0,  # greedy: the same JSON every run (sampling can ramble past the cap)
        extra_body={"schema": schema},
    )
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data["city"], str) and isinstance(data["year"], int)
    assert task_of(reply)["extracted"] == data
    # a config preset with its own schema
    person = client.chat.completions.create(
        model="person", messages=[{"role": "user", "content": "Ann is 31."}], temperature=0
    )
    parsed = json.loads(person.choices[0].message.content or "")
    assert set(parsed) >= {"name", "age"} and task_of(person)["parsed"] == parsed


def test_config_preset_and_errors(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "Where is the treasure?"}]
    )
    assert reply.model == "pirate@smollm2"
    assert reply.usage is not None and reply.usage.completion_tokens <= 12  # the preset's cap
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nosuch", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="summarize@nosuch", messages=[{"role": "user", "content": "x"}]
        )
    for extra, param in (({}, "labels"), ({"labels": ["a", "a"]}, "labels")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="classify", messages=[{"role": "user", "content": "x"}], extra_body=extra
            )
        assert bad.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="extract", messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["param"] == "schema"  # type: ignore[index]


async def test_presets_over_the_websocket(preset_server: RunningServer) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{preset_server.url}/v1/ws") as ws,
    ):
        await ws.send_json(
            {
                "type": "chat",
                "id": 1,
                "model": "classify",
                "labels": ["yes", "no"],
                "messages": [{"role": "user", "content": "Is the sky blue?"}],
            }
        )
        text = ""
        while True:
            event = await ws.receive_json(timeout=120)
            if event["type"] == "delta":
                text += event["content"]
            else:
                break
        assert event["type"] == "done", event
        assert text in ("yes", "no") and event["task"]["label"] == text
        assert event["model"] == "classify@smollm2"
        assert set(event["task"]["probabilities"]) == {"yes", "no"}
