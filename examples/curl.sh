#!/usr/bin/env bash
# Every route family of llmis with curl, against a running server:
#
#   LLMIS_URL=http://127.0.0.1:8080 MODEL=smollm2-135m-instruct ./examples/curl.sh
#
# Optional: EMBED_MODEL (an `embedding = true` model) for /v1/embeddings, INDEX (built with
# `llmis index`) for /v1/search, API_KEY for a server with [auth] keys (an admin key for the
# /admin routes). Each request fails the script on an HTTP error (curl -f), so a clean run
# means every route answered.
set -euo pipefail

URL=${LLMIS_URL:-http://127.0.0.1:8080}
MODEL=${MODEL:-smollm2-135m-instruct}
AUTH=()
if [ -n "${API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi
get() { curl -fsS "${AUTH[@]}" "$URL$1"; echo; }
post() { curl -fsS "${AUTH[@]}" -H 'Content-Type: application/json' "$URL$1" -d "$2"; echo; }

echo "## health and version"
get /healthz
get /version

echo "## models (OpenAI list shape, with state and GGUF metadata)"
get /v1/models
get "/v1/models/$MODEL"

echo "## chat completion"
post /v1/chat/completions '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Name three colours."}],
  "max_tokens": 24, "temperature": 0
}'

echo "## chat completion, streamed (Server-Sent Events; -N: print as it arrives)"
curl -fsSN "${AUTH[@]}" -H 'Content-Type: application/json' "$URL/v1/chat/completions" -d '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Count to five."}],
  "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}
}'

echo "## chat completion with JSON output (a grammar from the schema)"
post /v1/chat/completions '{
  "model": "'"$MODEL"'",
  "messages": [{"role": "user", "content": "Give a colour as JSON."}],
  "max_tokens": 32,
  "response_format": {"type": "json_schema", "json_schema": {"name": "colour", "schema": {
    "type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}}}
}'

echo "## text completion (a batch of two prompts)"
post /v1/completions '{
  "model": "'"$MODEL"'", "prompt": ["Once upon a time", "The sky is"], "max_tokens": 8
}'

if [ -n "${EMBED_MODEL:-}" ]; then
  echo "## embeddings"
  post /v1/embeddings '{"model": "'"$EMBED_MODEL"'", "input": ["first text", "second text"]}'
fi

echo "## the Responses API (stateless)"
post /v1/responses '{"model": "'"$MODEL"'", "input": "Say hello.", "max_output_tokens": 16}'

echo "## the simple routes: GET /models, POST /load, POST /infer (add ?stream=true for SSE)"
get /models
post /load '{"model": "'"$MODEL"'"}'
post /infer '{"model": "'"$MODEL"'", "prompt": "The sky is", "max_tokens": 8}'

echo "## Ollama's API: models, a chat (NDJSON lines, one per token; stream false for one object)"
get /api/tags
get /api/version
post /api/chat '{
  "model": "'"$MODEL"'", "stream": false, "options": {"num_predict": 8},
  "messages": [{"role": "user", "content": "Say hello."}]
}'

get /api/ps
post /api/show '{"model": "'"$MODEL"'"}'
post /api/generate '{"model": "'"$MODEL"'", "prompt": "The sky is", "stream": false, "options": {"num_predict": 8}}'
if [ -n "${EMBED_MODEL:-}" ]; then
  post /api/embed '{"model": "'"$EMBED_MODEL"'", "input": ["first text", "second text"]}'
  post /api/embeddings '{"model": "'"$EMBED_MODEL"'", "prompt": "one text (the older route)"}'
fi
# with the admin key: POST /api/pull {"model": "owner/repo:file.gguf"} streams NDJSON progress,
# DELETE /api/delete {"model": "name"} removes a file from the models directory

echo "## Anthropic's Messages API (x-api-key is accepted as the API key)"
post /v1/messages '{
  "model": "'"$MODEL"'", "max_tokens": 8,
  "messages": [{"role": "user", "content": "Say hello."}]
}'
post /v1/messages/count_tokens '{
  "model": "'"$MODEL"'", "messages": [{"role": "user", "content": "Say hello."}]
}'

echo "## search indexes"
get /v1/indexes
if [ -n "${INDEX:-}" ]; then
  post /v1/search '{"index": "'"$INDEX"'", "query": "how do I bake bread", "top_k": 3}'
fi

echo "## errors have OpenAI's shape (a 404 for an unknown model; -f off to see the body)"
curl -sS "${AUTH[@]}" -H 'Content-Type: application/json' "$URL/v1/chat/completions" \
  -d '{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}' \
  -w '\nHTTP %{http_code}\n'

echo "## admin: models with memory, load and unload (admin key, or loopback with auth off)"
get /admin/models
post /admin/models/load '{"name": "'"$MODEL"'"}'

echo "## metrics (Prometheus text format)"
curl -fsS "${AUTH[@]}" "$URL/metrics" | grep -E '^(vllm:generation_tokens_total|llmis:models_loaded)'

echo "## the OpenAPI document and the chat page"
openapi=$(curl -fsS "${AUTH[@]}" "$URL/openapi.json")
echo "${openapi:0:200}..."
curl -fsS "${AUTH[@]}" "$URL/" -o /dev/null -w 'GET / -> HTTP %{http_code}, %{content_type}\n'

echo "## WebSocket (/v1/ws): see examples/ws_client.py"
