"""The deployment files: Dockerfile (hadolint, same install steps as the suite's), systemd unit
(systemd-analyze verify), Prometheus and Grafana over the metrics a real server exports,
Kubernetes manifests (kubernetes-validate) and the config examples (llmis's own parser)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from llmis.config import load_settings
from llmis.models.budget import resolve_budget
from tests.conftest import REPO, RunningServer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra (make install)")
    return found


# ---- Dockerfile --------------------------------------------------------------------------------


def _dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for line in (REPO / "Dockerfile").read_text().splitlines():
        match = re.match(r"ARG (\w+)=(.*)$", line)
        if match:
            (value,) = shlex.split(match.group(2))
            args[match.group(1)] = value
    return args


def _install_sh_vars() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in (REPO / "scripts/install.sh").read_text().splitlines():
        match = re.match(r"(\w+)=(\S.*)$", line)
        if match and not match.group(2).startswith("$"):
            (values[match.group(1)],) = shlex.split(match.group(2))
    return values


def _pip_steps(text: str) -> list[str]:
    """The pip commands of a shell script or a Dockerfile, reduced to what they install:
    options that only say where files go or how loud pip is are dropped."""
    text = text.replace("\\\n", " ")
    steps = []
    for match in re.finditer(r"(?:\$PIP|python -m pip) (wheel|install) ([^&;\n]*)", text):
        words = [
            w
            for w in shlex.split(match.group(2))
            # where files go, and -e (the suite's checkout is editable, the image's is not)
            if w not in ("--quiet", "--no-cache-dir", "-e", "/wheels", "$cache")
        ]
        if words[:2] == ["--upgrade", "pip"]:
            continue  # install.sh refreshes the venv's pip; the image's is fresh already
        first = words[-1]
        if first.startswith("/wheels/") or first == "$wheel":
            first = "<the built wheel>"
        steps.append(f"{match.group(1)} {' '.join([*words[:-1], first])}")
    return steps


def test_dockerfile_builds_the_wheel_as_the_suite_does() -> None:
    """Same default CMAKE_ARGS, same llama-cpp-python version and the same three pip steps
    (build the wheel, install it, install the project with its extras) as scripts/install.sh,
    which `make install` / `make test` run."""
    docker, script = _dockerfile_args(), _install_sh_vars()
    assert docker["CMAKE_ARGS"] == script["DEFAULT_CMAKE_ARGS"]
    assert "-mno-amx-tile" in docker["CMAKE_ARGS"]
    assert docker["LLAMA_VERSION"] == script["LLAMA_VERSION"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"llama-cpp-python=={docker['LLAMA_VERSION']}" in pyproject["project"]["dependencies"]
    assert docker["EXTRAS"] in pyproject["project"]["optional-dependencies"]
    dockerfile = (REPO / "Dockerfile").read_text()
    install_sh = (REPO / "scripts/install.sh").read_text()
    expected = [
        "wheel --no-deps --wheel-dir llama-cpp-python==$LLAMA_VERSION",
        "install <the built wheel>",
        "install .[$EXTRAS]",
    ]
    assert _pip_steps(install_sh) == expected
    assert _pip_steps(dockerfile) == expected
    # CMAKE_ARGS is a build arg (overridable) and reaches the wheel build as an env var
    assert "export CMAKE_ARGS" in dockerfile
    assert re.search(r"^ARG CMAKE_ARGS=", dockerfile, re.M)


def test_dockerfile_shape() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\S+)", text, re.M)
    assert ("build-${BASE}", "builder") in stages and ("run-${BASE}", "runtime") in stages
    assert any("cuda" in image and "runtime" in image for image, _ in stages)  # CUDA variant
    assert "COPY --from=builder /opt/llmis /opt/llmis" in text
    assert re.search(r"^USER 10001", text, re.M)
    assert 'VOLUME ["/app/models"]' in text
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    assert re.search(r'^CMD \["serve", "--host", "0.0.0.0"', text, re.M)
    # what it copies exists, and the copied config is valid
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(.+) \S+$", text, re.M):
        for name in source.split():
            assert (REPO / name).exists(), name
    load_settings(REPO / "deploy/config/cpu.toml")
    # the build context keeps out the venv, models and caches
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore
    assert "!llmis/" in ignore and "!templates/" in ignore and "!deploy/config/" in ignore


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # and it does flag a bad Dockerfile (the check can fail)
    bad = subprocess.run(
        [_tool("hadolint"), "--no-color", "-"],
        input="FROM python\nRUN apt-get install curl\nUSER root\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout


# ---- systemd -----------------------------------------------------------------------------------


def _verify_unit(unit: Path, tmp_path: Path) -> str:
    systemd_analyze = shutil.which("systemd-analyze")
    if systemd_analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # verify checks that ExecStart's program exists: point it at a stand-in executable
    stub = tmp_path / "llmis"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    copy = tmp_path / "llmis.service"
    copy.write_text(unit.read_text().replace("/opt/llmis/bin/llmis", str(stub)))
    result = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (result.stdout + result.stderr).strip() + ("" if result.returncode == 0 else " (rc)")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = DEPLOY / "llmis.service"
    assert _verify_unit(unit, tmp_path) == ""
    bad = tmp_path / "bad"
    bad.mkdir()
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=bogus"))
    assert "ProtectSystem" in _verify_unit(broken, bad) or "protect system" in _verify_unit(
        broken, bad
    )


def test_systemd_unit_directives() -> None:
    lines = (DEPLOY / "llmis.service").read_text().splitlines()
    directives = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z]\w+=", line))
    assert directives["Restart"] == "on-failure"
    assert directives["NoNewPrivileges"] == "yes"
    assert directives["ProtectSystem"] == "strict"
    assert directives["ProtectHome"] == "yes"
    assert directives["PrivateTmp"] == "yes"
    assert directives["ReadWritePaths"] == "/var/lib/llmis"
    assert directives["EnvironmentFile"].lstrip("-") == "/etc/llmis/llmis.env"
    assert "llmis serve" in directives["ExecStart"]
    # the edge config the unit's comment installs writes only under ReadWritePaths
    edge = load_settings(REPO / "deploy/config/edge.toml")
    for path in (edge.server.models_dir, edge.server.indexes_dir):
        assert path.is_relative_to(directives["ReadWritePaths"])
    # the unit waits longer than llmis's own drain before SIGKILL
    assert float(directives["TimeoutStopSec"]) > edge.server.shutdown_grace_seconds


# ---- Prometheus and Grafana --------------------------------------------------------------------

_PROMQL_WORDS = {
    "sum",
    "by",
    "rate",
    "increase",
    "histogram_quantile",
    "label_values",
    "le",
    "model_name",
    "instance",
    "status",
    "reason",
    "kind",
}


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r'"[^"]*"', "", expr)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in _PROMQL_WORDS}


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def _scrape(server: RunningServer) -> set[str]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    names = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        # a labelled series with no observation yet is still declared (# TYPE)
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return names


def test_grafana_dashboard_uses_only_exported_metrics(server: RunningServer) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    # one streamed chat, so every labelled histogram and counter has samples
    body = json.dumps(
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "stream": True,
        }
    ).encode()
    request = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        assert b"data: [DONE]" in resp.read()
    exported = _scrape(server)
    used: set[str] = set()
    for expr in _dashboard_exprs(dashboard):
        used |= _metric_names(expr)
    missing = {name for name in used if name not in exported}
    assert not missing
    # what the issue asks the dashboard to show
    for name in (
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:num_requests_waiting",
        "llmis:models_loaded",
        "process_resident_memory_bytes",
    ):
        assert name in used, name
    # the parser is not vacuous: a misspelt name is caught
    assert _metric_names("rate(vllm:generation_token_total[1m])") - exported


def test_prometheus_scrape_config() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    static = jobs["llmis"]
    assert static["metrics_path"] == "/metrics"
    targets = [t for group in static["static_configs"] for t in group["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)
    assert "kubernetes_sd_configs" in jobs["llmis-pods"]


# ---- Kubernetes --------------------------------------------------------------------------------


def _k8s() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_k8s_manifests_validate() -> None:
    result = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "--quiet", "deploy/k8s.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_deployment(tmp_path: Path) -> None:
    kinds = _k8s()
    assert {"ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    config_text = kinds["ConfigMap"]["data"]["llmis.toml"]
    (tmp_path / "llmis.toml").write_text(config_text)
    settings = load_settings(tmp_path / "llmis.toml")
    pod = kinds["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == settings.server.port
    assert "/metrics" in settings.auth.open_paths and "/healthz" in settings.auth.open_paths
    # the memory request covers the RAM budget plus the process itself; the limit the request
    budget = resolve_budget(settings.server.ram_budget)
    units = {"Mi": 2**20, "Gi": 2**30}

    def size(text: str) -> int:
        return int(text[:-2]) * units[text[-2:]]

    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert size(requests["memory"]) >= budget + 256 * 2**20
    assert size(limits["memory"]) >= size(requests["memory"])
    # models live on the PVC, mounted where the config's models_dir points
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert Path(mounts["models"]) == settings.server.models_dir
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the grace period outlasts llmis's drain
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.server.shutdown_grace_seconds
    service = kinds["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


# ---- config examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cpu", "cuda", "edge"])
def test_config_examples_load(name: str) -> None:
    settings = load_settings(DEPLOY / "config" / f"{name}.toml")
    assert settings.models
    if name == "cuda":
        assert all(m.n_gpu_layers != 0 for m in settings.models)
    if name == "edge":
        assert len(settings.models) >= 3 and any(m.embedding for m in settings.models)
        assert any(m.pin for m in settings.models)
