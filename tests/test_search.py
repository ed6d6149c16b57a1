"""`llmis index` (a real subprocess on the example CSV) and /v1/search, /v1/indexes on a real
server with the converted MiniLM model; bad CSVs; the store and the top-k maths in process."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from llmis.index.build import IndexBuildError, read_table
from llmis.index.search import top_k
from llmis.index.store import Index, IndexRow, Manifest, load_index, save_index
from tests.conftest import REPO, RunningServer
from tests.test_embeddings import embedding_config

TOPICS = REPO / "data" / "topics.csv"
QUERIES = REPO / "data" / "queries.csv"


def run_index(
    workdir: Path, csv_path: Path, out: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llmis",
            "index",
            str(csv_path),
            "--config",
            "llmis.toml",
            "--text-column",
            "text",
            "--out",
            out,
            "--no-progress",
            *extra,
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index")
    (path / "llmis.toml").write_text(embedding_config(f'indexes_dir = "{path / "indexes"}"'))
    done = run_index(path, TOPICS, "topics", "--id-column", "id", "--model", "minilm")
    assert done.returncode == 0, done.stderr
    assert "102 rows (102 embedded, 0 unchanged)" in done.stdout
    return path


@pytest.fixture(scope="module")
def search_server(workdir: Path, start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server((workdir / "llmis.toml").read_text())


def results(body: dict[str, object]) -> list[dict[str, object]]:
    data = body["data"]
    assert isinstance(data, list)
    return data


def error_code(body: dict[str, object]) -> object:
    error = body["error"]
    assert isinstance(error, dict)
    return error["code"]


# ----- index + search through the real server -----


def test_indexes_lists_model_and_rows(search_server: RunningServer) -> None:
    status, body = search_server.get_json("/v1/indexes")
    assert status == 200
    listed = {item["id"]: item for item in body["data"]}  # type: ignore[index]
    assert listed["topics"]["model"] == "minilm"
    assert listed["topics"]["rows"] == 102
    assert listed["topics"]["dimensions"] == 384
    assert listed["topics"]["columns"] == ["id", "title", "category", "text"]


def test_search_returns_the_expected_topic(search_server: RunningServer) -> None:
    status, body = search_server.post_json(
        "/v1/search",
        {"index": "topics", "query": "my puppy keeps peeing on the carpet", "top_k": 3},
    )
    assert status == 200, body
    hits = results(body)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["id"] == "pet-dogs"
    assert hits[0]["fields"]["title"] == "Dog care"  # type: ignore[index]
    scores = [float(h["score"]) for h in hits]  # type: ignore[arg-type]
    assert scores == sorted(scores, reverse=True)
    assert 0.0 < scores[-1] <= scores[0] <= 1.0
    assert body["model"] == "minilm"
    assert body["usage"]["prompt_tokens"] > 2  # type: ignore[index]


def test_labelled_queries_recall_at_3(search_server: RunningServer) -> None:
    with QUERIES.open(encoding="utf-8") as handle:
        labelled = [(r["query"], r["expected_id"]) for r in csv.DictReader(handle)]
    found = 0
    for query, expected in labelled:
        status, body = search_server.post_json(
            "/v1/search", {"index": "topics", "query": query, "top_k": 3}
        )
        assert status == 200
        found += expected in [h["id"] for h in results(body)]
    assert found / len(labelled) >= 0.9, f"recall@3 = {found}/{len(labelled)}"


def test_search_errors(search_server: RunningServer, workdir: Path) -> None:
    status, body = search_server.post_json("/v1/search", {"index": "nope", "query": "x"})
    assert (status, error_code(body)) == (404, "index_not_found")
    status, body = search_server.post_json(
        "/v1/search", {"index": "topics", "query": "x", "model": "smollm2-embed"}
    )
    assert (status, error_code(body)) == (400, "index_model_mismatch")
    assert "built with the model 'minilm'" in body["error"]["message"]  # type: ignore[index]
    for bad in ({"query": "   "}, {"top_k": 0}, {"top_k": 101}):
        status, body = search_server.post_json(
            "/v1/search", {"index": "topics", "query": "x", **bad}
        )
        assert status == 400, bad
    ghost = load_index(workdir / "indexes" / "topics")
    manifest = ghost.manifest.model_copy(update={"name": "ghost", "model": "not-served"})
    save_index(workdir / "indexes", manifest, ghost.rows, ghost.vectors)
    status, body = search_server.post_json("/v1/search", {"index": "ghost", "query": "x"})
    assert (status, error_code(body)) == (400, "index_model_unavailable")


def test_reindex_embeds_only_changed_rows(
    search_server: RunningServer, workdir: Path, tmp_path: Path
) -> None:
    with TOPICS.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    source = tmp_path / "topics.csv"
    shutil.copy(TOPICS, source)
    first = run_index(workdir, source, "incremental", "--id-column", "id", "--model", "minilm")
    assert first.returncode == 0, first.stderr
    before = load_index(workdir / "indexes" / "incremental")

    body[0][3] = "Sharpening kitchen knives on a whetstone and honing steel."  # changed text
    body[1][1] = "Renamed title only"  # another column: no re-embedding needed
    del body[2]  # removed
    body.append(["origami", "Origami", "hobbies", "Folding paper cranes and boats."])  # added
    with source.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([header, *body])
    second = run_index(workdir, source, "incremental", "--id-column", "id", "--model", "minilm")
    assert second.returncode == 0, second.stderr
    assert "102 rows (2 embedded, 100 unchanged)" in second.stdout
    after = load_index(workdir / "indexes" / "incremental")
    old = {r.id: before.vectors[i] for i, r in enumerate(before.rows)}
    for i, row in enumerate(after.rows):
        if row.id not in (body[0][0], "origami"):
            np.testing.assert_array_equal(after.vectors[i], old[row.id])
    changed = next(i for i, r in enumerate(after.rows) if r.id == body[0][0])
    assert float(after.vectors[changed] @ old[body[0][0]]) < 0.99
    assert next(r for r in after.rows if r.id == body[1][0]).fields["title"] == "Renamed title only"

    # the running server sees the rebuilt index without a restart
    status, found = search_server.post_json(
        "/v1/search", {"index": "incremental", "query": "paper folding art"}
    )
    assert status == 200
    assert results(found)[0]["id"] == "origami"


# ----- bad CSVs and models: clear errors, nothing left behind -----


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"id,title\nx,y\n",
            "no column 'text' (--text-column); the columns are: id, title",
        ),
        (b"", "the file is empty"),
        ("id,text\n1,caf\u00e9 cr\u00e8me\n".encode("latin-1"), "not valid utf-8-sig"),
    ],
    ids=["missing-column", "empty-file", "wrong-encoding"],
)
def test_bad_csv_is_a_clear_error_with_no_partial_index(
    workdir: Path, tmp_path: Path, content: bytes, message: str
) -> None:
    indexes = workdir / "indexes"
    manifest_before = (indexes / "topics" / "index.json").read_bytes()
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    for out in ("fresh", "topics"):  # a new index, and an existing one to be replaced
        done = run_index(workdir, bad, out, "--model", "minilm")
        assert done.returncode == 1
        assert message in done.stderr
        assert "Traceback" not in done.stderr
    assert not (indexes / "fresh").exists()
    assert (indexes / "topics" / "index.json").read_bytes() == manifest_before
    assert [p.name for p in indexes.iterdir() if p.name.startswith(".")] == []


def test_index_with_a_model_that_cannot_embed(workdir: Path) -> None:
    done = run_index(workdir, TOPICS, "chat", "--model", "smollm2-chat")
    assert done.returncode == 1
    assert "does not serve embeddings" in done.stderr
    assert not (workdir / "indexes" / "chat").exists()


# ----- in process: CSV checks, store, top-k -----


def write(tmp_path: Path, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "t.csv"
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,text\n", "no data rows"),
        ("id,text\n1,a\n2,b,extra\n", "data row 2 has 3 fields; the header has 2"),
        ("id,text\n1,a\n1,b\n", "'id' '1' is used by data rows 1 and 2"),
        ("id,text,text\n1,a,b\n", "repeats a column name"),
        ("id,text\n,a\n", "data row 1 has an empty 'id'"),
        ("   \n\n", "the file is empty"),
    ],
)
def test_read_table_rejects(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(IndexBuildError, match=message.replace("(", r"\(")):
        read_table(write(tmp_path, text), "text", "id")


def test_read_table_accepts_bom_quotes_and_blank_text(tmp_path: Path) -> None:
    path = write(tmp_path, '\ufeffid,text\n1,"multi\nline, quoted"\n2,\n\n3,plain\n')
    table = read_table(path, "text", "id")
    assert table.columns == ("id", "text")
    assert [r.id for r in table.rows] == ["1", "3"]
    assert table.rows[0].text == "multi\nline, quoted"
    assert table.blank == 1
    assert read_table(path, "text").rows[1].id == "4"  # no id column: the data row number


def _index(vectors: list[list[float]]) -> Index:
    matrix = np.asarray(vectors, dtype=np.float32)
    rows = [IndexRow(str(i), f"t{i}", f"h{i}", {}) for i in range(len(vectors))]
    manifest = Manifest(
        name="unit",
        model="m",
        model_file="m.gguf",
        model_size=1,
        dimensions=matrix.shape[1],
        rows=len(rows),
        text_column="text",
        id_column=None,
        columns=("text",),
        source="-",
        created=0,
        updated=0,
    )
    return Index(manifest, rows, matrix)


def test_top_k_orders_by_cosine() -> None:
    index = _index([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]])
    hits = top_k(index, np.asarray([0.8, 0.6], dtype=np.float32), 3)
    assert [(h.rank, h.row.id) for h in hits] == [(1, "2"), (2, "0"), (3, "1")]
    assert [h.score for h in hits] == pytest.approx([0.96, 0.8, 0.6])
    assert [h.row.id for h in top_k(index, np.asarray([1, 0], dtype=np.float32), 10)] == [
        "0",
        "2",
        "1",
        "3",
    ]


def test_save_index_replaces_whole_and_keeps_the_old_on_failure(tmp_path: Path) -> None:
    first = _index([[1, 0]])
    save_index(tmp_path, first.manifest, first.rows, first.vectors)
    second = _index([[0, 1], [1, 0]])
    save_index(tmp_path, second.manifest, second.rows, second.vectors)
    loaded = load_index(tmp_path / "unit")
    assert loaded.manifest.rows == 2
    np.testing.assert_array_equal(loaded.vectors, second.vectors)
    unserialisable = [IndexRow("0", "t", "h", {"x": {1}}), *second.rows[1:]]  # type: ignore[dict-item]
    with pytest.raises(TypeError):  # json.dumps fails half-way through the build
        save_index(tmp_path, second.manifest, unserialisable, second.vectors)
    assert load_index(tmp_path / "unit").manifest.rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit"]
