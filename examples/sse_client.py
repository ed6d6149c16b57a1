#!/usr/bin/env python3
"""A minimal streaming chat client: POST /v1/chat/completions with "stream": true, read the
Server-Sent Events and print the text as it arrives. Standard library only.

    python examples/sse_client.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct \\
        "Write a haiku about the sea."
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def stream_chat(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, object]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    request = urllib.request.Request(
        f"{url.rstrip('/')}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    finish, usage = None, None
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:  # one line at a time, as the server sends them
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data:"):
                continue  # blank lines end events; ": ping" lines keep the connection alive
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk["choices"]:
                print(choice["delta"].get("content") or "", end="", flush=True)
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    print()
    return {"finish_reason": finish, "usage": usage}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    try:
        summary = stream_chat(args.url, args.model, args.prompt, args.max_tokens)
    except urllib.error.HTTPError as exc:  # the body is OpenAI's error shape
        print(f"HTTP {exc.code}: {json.loads(exc.read())['error']['message']}", file=sys.stderr)
        return 1
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
