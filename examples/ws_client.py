#!/usr/bin/env python3
"""A minimal WebSocket chat client for /v1/ws: two chats at once on one socket, told apart by
their ids, text printed as it arrives, then a cancelled third one. Needs aiohttp (an llmis
dependency).

    python examples/ws_client.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import aiohttp


async def chat_over_ws(url: str, model: str, max_tokens: int) -> dict[str, dict[str, object]]:
    ws_url = url.rstrip("/").replace("http", "ws", 1) + "/v1/ws"
    prompts = {"colours": "Name three colours.", "animals": "Name three animals."}
    texts = {chat_id: "" for chat_id in prompts}
    results: dict[str, dict[str, object]] = {}
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url) as ws:
        await ws.send_json({"type": "ping", "id": 0})
        for chat_id, prompt in prompts.items():
            await ws.send_json(
                {
                    "type": "chat",
                    "id": chat_id,
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens,
                }
            )
        # a third chat, cancelled as soon as its first piece arrives
        await ws.send_json(
            {
                "type": "chat",
                "id": "story",
                "model": model,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 512,
            }
        )
        texts["story"] = ""
        while len(results) < len(texts):
            message = await ws.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the socket closed: {message.type.name}")
            event = json.loads(message.data)
            chat_id = event.get("id")
            if event["type"] == "pong":
                print("[pong]", file=sys.stderr)
            elif event["type"] == "delta":
                texts[chat_id] += event["content"]
                print(f"[{chat_id}] {event['content']!r}")
                if chat_id == "story" and "story" not in results:
                    await ws.send_json({"type": "cancel", "id": "story"})
            elif event["type"] in ("done", "error"):
                results[chat_id] = {**event, "text": texts[chat_id]}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    results = asyncio.run(chat_over_ws(args.url, args.model, args.max_tokens))
    for chat_id, result in results.items():
        print(json.dumps({"id": chat_id, **{k: v for k, v in result.items() if k != "id"}}))
    return 1 if any(r["type"] == "error" for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
