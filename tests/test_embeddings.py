"""POST /v1/embeddings against real GGUF models through a real server, plus the MiniLM GGUF.

The server serves all-MiniLM-L6-v2 (converted by ``scripts/convert_minilm.py``, cached under
``models/.converted``), the bundled SmolLM2 as an embedding model (mean-pooled by llmis) and
SmolLM2 as a plain chat model (which must refuse embeddings).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openai
import pytest
from pydantic import ValidationError

from llmis.api.embeddings import EmbeddingRequest
from llmis.errors import BadRequestError
from llmis.serving.embeddings import normalise, truncate_dimensions
from tests.conftest import REPO, SMOLLM_RESOURCE, RunningServer

MODELS_DIR = REPO / "models"
MINILM = MODELS_DIR / ".converted" / "all-MiniLM-L6-v2.gguf"
HELLO_WORLD_IDS = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in the BERT vocabulary


def minilm_path() -> Path:
    """The converted MiniLM GGUF, converting it once (``make minilm`` does the same)."""
    if not MINILM.is_file():
        done = subprocess.run(
            [sys.executable, "-m", "scripts.convert_minilm", "--models-dir", str(MODELS_DIR)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.fail(f"converting MiniLM failed (try `make minilm`):\n{done.stderr}")
    return MINILM


def embedding_config(extra_server: str = "") -> str:
    return f"""
[server]
host = "127.0.0.1"
threads = 2
max_body_bytes = 1048576
models_dir = "{MODELS_DIR}"
{extra_server}

[[models]]
name = "minilm"
path = ".converted/{minilm_path().name}"
n_ctx = 512
embedding = true

[[models]]
name = "smollm2-embed"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
embedding = true

[[models]]
name = "smollm2-chat"
resource = "{SMOLLM_RESOURCE}"
n_ctx = 512
"""


@pytest.fixture(scope="module")
def embed_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(embedding_config())


@pytest.fixture(scope="module")
def client(embed_server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=embed_server.base_url, api_key="unused", max_retries=0)


def post(server: RunningServer, body: object) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        server.url + "/v1/embeddings",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def error_of(body: dict[str, object]) -> dict[str, object]:
    error = body["error"]
    assert isinstance(error, dict)
    return error


def vectors(body: dict[str, object]) -> np.ndarray:
    data = body["data"]
    assert isinstance(data, list)
    assert [item["index"] for item in data] == list(range(len(data)))
    return np.asarray([item["embedding"] for item in data], dtype=np.float32)


# ----- the openai SDK against the real server -----


def test_sdk_embeddings_create_is_semantic(client: openai.OpenAI) -> None:
    texts = ["How do I bake sourdough bread?", "A recipe for a crusty loaf", "Stock prices fell"]
    result = client.embeddings.create(model="minilm", input=texts)  # SDK asks for base64
    assert result.model == "minilm"
    assert result.object == "list"
    got = np.asarray([d.embedding for d in result.data], dtype=np.float32)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # bread ~ loaf, far from the stock market
    assert result.usage.prompt_tokens == result.usage.total_tokens > 3 * 2


def test_sdk_float_and_base64_agree(client: openai.OpenAI, embed_server: RunningServer) -> None:
    status, body = post(
        embed_server, {"model": "minilm", "input": "hello world", "encoding_format": "base64"}
    )
    assert status == 200
    item = body["data"][0]  # type: ignore[index]
    raw = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    as_float = client.embeddings.create(
        model="minilm", input="hello world", encoding_format="float"
    )
    np.testing.assert_array_equal(raw, np.asarray(as_float.data[0].embedding, dtype=np.float32))


def test_token_arrays_embed_like_text(embed_server: RunningServer) -> None:
    status, text_body = post(embed_server, {"model": "minilm", "input": "hello world"})
    assert status == 200
    assert text_body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    status, ids_body = post(embed_server, {"model": "minilm", "input": HELLO_WORLD_IDS})
    assert status == 200
    status, batch_body = post(
        embed_server, {"model": "minilm", "input": [HELLO_WORLD_IDS, [101, 7592, 102]]}
    )
    assert status == 200
    assert batch_body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    np.testing.assert_allclose(vectors(ids_body)[0], vectors(text_body)[0], atol=1e-6)
    np.testing.assert_allclose(vectors(batch_body)[0], vectors(text_body)[0], atol=1e-5)


def test_dimensions_truncates_and_renormalises(embed_server: RunningServer) -> None:
    _, full = post(embed_server, {"model": "minilm", "input": "a cat on a mat"})
    status, short = post(
        embed_server, {"model": "minilm", "input": "a cat on a mat", "dimensions": 64}
    )
    assert status == 200
    cut = vectors(short)[0]
    assert cut.shape == (64,)
    prefix = vectors(full)[0][:64]
    np.testing.assert_allclose(cut, prefix / np.linalg.norm(prefix), atol=1e-5)
    status, body = post(embed_server, {"model": "minilm", "input": "x", "dimensions": 385})
    assert status == 400
    assert error_of(body)["param"] == "dimensions"


def test_smollm2_mean_pooled_embeddings(embed_server: RunningServer) -> None:
    texts = ["The weather is sunny today.", "Quantum computers use qubits."]
    status, batch = post(embed_server, {"model": "smollm2-embed", "input": texts})
    assert status == 200
    got = vectors(batch)
    assert got.shape == (2, 576)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    _, single = post(embed_server, {"model": "smollm2-embed", "input": texts[1]})
    np.testing.assert_allclose(vectors(single)[0], got[1], atol=1e-4)  # batching changes nothing
    # the same model still generates after embedding (the KV cache was cleared, not reused)
    request = urllib.request.Request(
        embed_server.url + "/v1/completions",
        json.dumps({"model": "smollm2-embed", "prompt": "The sky is", "max_tokens": 2}).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] == 2


# ----- errors -----


def test_model_that_cannot_embed_is_a_400(embed_server: RunningServer) -> None:
    status, body = post(embed_server, {"model": "smollm2-chat", "input": "hi"})
    assert status == 400
    error = error_of(body)
    assert error["code"] == "embeddings_not_supported"
    assert error["param"] == "model"
    assert "embedding = true" in str(error["message"])
    status, body = post(embed_server, {"model": "no-such-model", "input": "hi"})
    assert status == 404
    assert error_of(body)["code"] == "model_not_found"


def test_sdk_raises_bad_request_for_a_chat_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="smollm2-chat", input="hi")
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"input": ""}, "empty string"),
        ({"input": []}, "must not be empty"),
        ({"input": ["a", [1, 2]]}, "not a mix"),
        ({"input": ["a", ""]}, "input[1] is empty"),
        ({"input": {"text": "a"}}, "input must be a string"),
        ({"input": [[1, 2], []]}, "input[1] is empty"),
        ({"input": [5, 999_999]}, "token ids must be in [0, 30522)"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_input_is_a_clear_400(
    embed_server: RunningServer, payload: dict[str, object], fragment: str
) -> None:
    status, body = post(embed_server, {"model": "minilm", **payload})
    assert status == 400, body
    assert fragment in str(error_of(body)["message"])


def test_input_longer_than_the_model_takes(embed_server: RunningServer) -> None:
    status, body = post(embed_server, {"model": "minilm", "input": "word " * 600})
    assert status == 400
    error = error_of(body)
    assert error["code"] == "context_length_exceeded"
    assert "at most 512 tokens" in str(error["message"])
    status, _ = post(embed_server, {"model": "minilm", "input": "still serving"})
    assert status == 200


# ----- the converted model and the pure helpers -----


def test_minilm_gguf_matches_the_sentence_transformers_reference() -> None:
    from scripts.convert_minilm import verify

    cosines = verify(minilm_path(), tolerance=0.999)
    assert len(cosines) >= 5
    assert min(cosines) >= 0.999


def test_truncate_dimensions_and_normalise() -> None:
    rows = normalise(np.asarray([[3.0, 4.0, 12.0], [0.0, 0.0, 0.0]], dtype=np.float32))
    np.testing.assert_allclose(rows[0], [3 / 13, 4 / 13, 12 / 13], rtol=1e-6)
    np.testing.assert_array_equal(rows[1], [0.0, 0.0, 0.0])
    cut = truncate_dimensions(rows[:1], 2)
    np.testing.assert_allclose(cut[0], [0.6, 0.8], rtol=1e-6)
    assert truncate_dimensions(rows, None) is rows
    with pytest.raises(BadRequestError):
        truncate_dimensions(rows, 4)


def test_request_schema_shapes() -> None:
    assert EmbeddingRequest.model_validate({"model": "m", "input": "a"}).inputs() == ["a"]
    assert EmbeddingRequest.model_validate({"model": "m", "input": [1, 2]}).inputs() == [[1, 2]]
    assert EmbeddingRequest.model_validate({"model": "m", "input": [[1], [2]]}).inputs() == [
        [1],
        [2],
    ]
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": [True, False]})
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": ["a"] * 2049})


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
def test_generation_on_an_embedding_model_is_a_clear_400(
    embed_server: RunningServer, path: str, body: dict[str, object]
) -> None:
    request = urllib.request.Request(
        embed_server.url + path,
        json.dumps({"model": "minilm", "max_tokens": 2, **body}).encode(),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400
    error = json.loads(info.value.read())["error"]
    assert error["code"] == "generation_not_supported"
    assert error["param"] == "model"


def test_vector_json_reads_back_to_the_same_float32() -> None:
    """Embedding bodies are written by orjson straight from the float32 arrays: each number
    is the shortest text that reads back to the same float32, views included."""
    import json

    import numpy as np

    from llmis.api.embeddings import vectors_response

    rows = np.random.default_rng(7).standard_normal((3, 384)).astype(np.float32)
    response = vectors_response({"data": [rows[0], rows[1:, :5]], "n": 1})
    assert response.content_type == "application/json"
    assert isinstance(response.body, bytes)
    body = json.loads(response.body)
    assert np.array_equal(np.asarray(body["data"][0], dtype=np.float32), rows[0])
    assert np.array_equal(np.asarray(body["data"][1], dtype=np.float32), rows[1:, :5])
    assert body["n"] == 1
