#!/usr/bin/env bash
# `make scale-demo`: two llmis replicas (127.0.0.1:8081 and :8082, deploy/config/cpu.toml) and
# LiteLLM's proxy in front of them (127.0.0.1:4000, deploy/litellm.yaml), on loopback.
# Ctrl-C stops all three.
set -euo pipefail

VENV=${VENV:-.venv}
LITELLM_VENV=${LITELLM_VENV:-.venv-litellm}
export LITELLM_MASTER_KEY=${LITELLM_MASTER_KEY:-sk-llmis-demo}
export LITELLM_LOCAL_MODEL_COST_MAP=True  # the model cost map from the package, not the internet
export LITELLM_TELEMETRY=False
export LLMIS_API_KEY=${LLMIS_API_KEY:-unused}

pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

for port in 8081 8082; do
    "$VENV/bin/llmis" serve --config deploy/config/cpu.toml --port "$port" &
    pids+=($!)
done
"$LITELLM_VENV/bin/litellm" --config deploy/litellm.yaml --host 127.0.0.1 --port 4000 \
    --num_workers 1 &
pids+=($!)

until curl -fs http://127.0.0.1:4000/health/liveliness >/dev/null; do sleep 1; done
cat <<MSG

LiteLLM on http://127.0.0.1:4000 in front of llmis on :8081 and :8082. Try:
  curl -N http://127.0.0.1:4000/v1/chat/completions -H "Authorization: Bearer $LITELLM_MASTER_KEY" \\
    -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
  curl -s http://127.0.0.1:8081/metrics | grep vllm:request_success    # per replica
Ctrl-C stops all three.
MSG
wait -n
