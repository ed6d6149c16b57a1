"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from llmis.api.middleware import read_json, request_policy
from llmis.api.openai_bodies import (
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    now,
    usage_chunk,
)
from llmis.api.sse import EventStream
from llmis.engine.jobs import Delta, Failed, Finished
from llmis.engine.logprobs import chat_logprobs, completion_logprobs
from llmis.errors import ModelNotFoundError
from llmis.ops.app_keys import MANAGER, PRESETS, SETTINGS, task_services
from llmis.ops.families import error_for
from llmis.serving.chunking import coalesce, pacing
from llmis.serving.formats import compile_grammar
from llmis.serving.generation import Generation, start_chat, start_completion
from llmis.serving.protocol import ChatCompletionRequest, CompletionRequest
from llmis.serving.toolcalls import chat_deltas, tool_call_objects
from llmis.tasks.plan import TaskPlan, plan_chat, plan_completion

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """Every model and alias, with its state and GGUF metadata as extra fields."""
    manager = request.app[MANAGER]
    await manager.refresh()
    data = manager.openai_objects() + request.app[PRESETS].openai_objects(manager)
    return web.json_response({"object": "list", "data": data})


@routes.get("/v1/models/{name:.+}")
async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    manager = request.app[MANAGER]
    try:
        entry = manager.entry(name)
    except ModelNotFoundError:
        for preset in request.app[PRESETS].openai_objects(manager):
            if preset["id"] == name:
                return web.json_response(preset)
        raise
    return web.json_response(entry.openai_object(name))


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    req, plan = await plan_chat(task_services(request.app), await read_json(request))
    await compile_grammar(req)
    generation = await start_chat(request.app[MANAGER], req, request_policy(request, req.model))
    if plan is not None:  # a preset: the response names it
        generation = dataclasses.replace(generation, model=plan.model_id)
    try:
        if req.stream:
            return await _stream_chat(request, req, generation, plan)
        result = await generation.collect(generation.jobs[0])
        parser = generation.parser()
        parser.feed(result.text)
        parser.finish()
        body = chat_response(
            new_id("chatcmpl"),
            generation.model,
            now(),
            parser.content,
            parser.finish_reason(result.finish_reason),
            result.prompt_tokens,
            result.completion_tokens,
            result.cached_tokens,
            tool_calls=tool_call_objects(parser),
            logprobs=chat_logprobs(result.logprobs) if req.logprobs else None,
        )
        if plan is not None:
            body.update(await plan.result(result.text))
        return web.json_response(body)
    finally:
        generation.cancel()


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    """A completion; addressed to a preset, the prompt is the user message of a chat request
    (:func:`llmis.tasks.plan.plan_completion`) and the response carries a ``task`` object."""
    body = await read_json(request)
    req = CompletionRequest.model_validate(body)
    manager = request.app[MANAGER]
    planned = (
        await plan_completion(task_services(request.app), req, body)
        if isinstance(body, dict)
        else None
    )
    plan: TaskPlan | None = None
    if planned is not None:
        chat, plan = planned
        await compile_grammar(chat)
        started = await start_chat(manager, chat, request_policy(request, chat.model))
        generation = dataclasses.replace(started, model=plan.model_id)
    else:
        await compile_grammar(req)
        generation = await start_completion(manager, req, request_policy(request, req.model))
    try:
        if req.stream:
            return await _stream_completion(request, req, generation, plan)
        results = [await generation.collect(job) for job in generation.jobs]
        reply = completion_response(
            new_id("cmpl"),
            generation.model,
            now(),
            [(r.text, r.finish_reason) for r in results],
            sum(r.prompt_tokens for r in results),
            sum(r.completion_tokens for r in results),
            sum(r.cached_tokens for r in results),
            logprobs=[completion_logprobs(r.logprobs) for r in results]
            if req.logprobs is not None
            else None,
        )
        if plan is not None:
            reply.update(await plan.result(results[0].text))
        return web.json_response(reply)
    finally:
        generation.cancel()


async def _stream_chat(
    request: web.Request,
    req: ChatCompletionRequest,
    generation: Generation,
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    id_, created, model = new_id("chatcmpl"), now(), generation.model
    usage = req.include_usage
    server = request.app[SETTINGS].server
    keepalive = server.keepalive_seconds
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    try:
        await sse.prepare()
        first = chat_chunk(id_, model, created, {"role": "assistant", "content": ""}, None, usage)
        await sse.send({**first, **plan.first()} if plan is not None else first)
        parts: list[str] = []
        parser = generation.parser()
        want_logprobs = req.logprobs
        pace = pacing(request.app[SETTINGS].streaming, req.stream_options)
        async for event in coalesce(generation.events(generation.jobs[0], keepalive), pace):
            if event is None:
                await sse.ping()
            elif isinstance(event, Delta):
                if plan is not None:
                    parts.append(event.text)
                logprobs = chat_logprobs(event.logprobs) if want_logprobs else None
                deltas = chat_deltas(parser.feed(event.text))
                if not deltas and logprobs is not None and event.logprobs:
                    deltas = [{"content": ""}]  # the tokens' logprobs go out with the tokens
                for delta in deltas:
                    await sse.send(chat_chunk(id_, model, created, delta, None, usage, logprobs))
                    logprobs = None
            elif isinstance(event, Finished):
                for delta in chat_deltas(parser.finish()):
                    await sse.send(chat_chunk(id_, model, created, delta, None, usage))
                reason = parser.finish_reason(event.finish_reason)
                last = chat_chunk(id_, model, created, {}, reason, usage)
                if plan is not None:
                    last.update(await plan.result("".join(parts)))
                await sse.send(last)
                if usage:
                    await sse.send(
                        usage_chunk(
                            id_,
                            "chat.completion.chunk",
                            model,
                            created,
                            event.prompt_tokens,
                            event.completion_tokens,
                            event.cached_tokens,
                        )
                    )
            elif isinstance(event, Failed):
                await sse.send(error_for("openai", event.error))
        await sse.done()
    except ConnectionResetError:
        pass  # the client left; the caller cancels the job
    return sse.response


async def _stream_completion(
    request: web.Request,
    req: CompletionRequest,
    generation: Generation,
    plan: TaskPlan | None = None,
) -> web.StreamResponse:
    id_, created, model = new_id("cmpl"), now(), generation.model
    usage = req.include_usage
    server = request.app[SETTINGS].server
    keepalive = server.keepalive_seconds
    sse = EventStream(request, write_timeout=server.write_timeout_seconds)
    prompt_tokens = completion_tokens = cached_tokens = 0
    parts: list[str] = []  # a preset's text, for its task result
    try:
        await sse.prepare()
        if plan is not None:  # what the task knows before generating, as chat's first chunk
            opening = completion_chunk(id_, model, created, 0, "", None, usage)
            await sse.send({**opening, **plan.first()})
        for index, job in enumerate(generation.jobs):
            offset = 0
            pace = pacing(request.app[SETTINGS].streaming, req.stream_options)
            async for event in coalesce(generation.events(job, keepalive), pace):
                if event is None:
                    await sse.ping()
                elif isinstance(event, Delta):
                    if plan is not None:
                        parts.append(event.text)
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = completion_logprobs(event.logprobs, offset)
                        offset += len(event.text)
                    await sse.send(
                        completion_chunk(
                            id_, model, created, index, event.text, None, usage, logprobs
                        )
                    )
                elif isinstance(event, Finished):
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                    cached_tokens += event.cached_tokens
                    last = completion_chunk(
                        id_, model, created, index, "", event.finish_reason, usage
                    )
                    if plan is not None:
                        last.update(await plan.result("".join(parts)))
                    await sse.send(last)
                elif isinstance(event, Failed):
                    await sse.send(error_for("openai", event.error))
        if usage:
            await sse.send(
                usage_chunk(
                    id_,
                    "text_completion",
                    model,
                    created,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                )
            )
        await sse.done()
    except ConnectionResetError:
        pass
    return sse.response
