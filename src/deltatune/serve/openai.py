"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

The subset of the OpenAI API that vLLM serves for text, so the official ``openai`` client (and
anything built on it) works against ``deltatune serve``: ``model`` names a delta or the base;
sampling fields, ``n``, ``stop``, ``seed``, log-probabilities, penalties, ``usage`` and
``finish_reason`` mean what they mean there. Streaming sends server-sent events in the standard
chunk shapes, ending with ``data: [DONE]``; a choice's log-probabilities (all its tokens) come
with its last chunk; a client that disconnects stops its generation.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from .batcher import COMPLETE, Batcher, Job
from .completions import Choice
from .engine import CAUSAL_LM, Engine, Work
from .errors import ApiError, as_api_error, error_responses
from .library import AUTO, BASE
from .sampling import Generation
from .schemas import ChatRequest, CompletionRequest, Sampled


def openai_router(engine: Engine, batcher: Batcher, settings, responses: dict) -> APIRouter:
    """The routes, for ``engine``'s base and deltas, with ``settings``' limits."""
    router = APIRouter()
    created = int(time.time())
    generates = engine.task == CAUSAL_LM  # the schema lists only the routes this base serves
    chats = generates and bool(getattr(engine.tokenizer, "chat_template", None))

    def delta_of(name: str) -> str | None:
        if name in (BASE, engine.model_name):
            return None
        if name == AUTO:  # the library's router chooses (see Engine.auto_deltas)
            return AUTO
        engine.library.folder(name)  # 400 for a bad name, 404 for an unknown one
        return name

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": created, "owned_by": "deltatune"}
        return card if name == engine.model_name else {**card, "parent": engine.model_name, "root": engine.model_name}

    @router.get("/v1/models", responses=responses)
    async def list_models() -> dict:
        """The base and every delta in the deltas folder, as OpenAI model cards (a delta's ``parent`` is the base)."""
        return {"object": "list", "data": [model_card(engine.model_name)]
                + [model_card(name) for name in engine.library.available()]}

    @router.get("/v1/models/{model:path}", responses=error_responses(400, 404))
    async def get_model(model: str) -> dict:
        """One model card: the base (its id or ``base``) or a delta."""
        return model_card(engine.model_name if delta_of(model) is None else model)

    event = {"type": "object", "required": ["data"],  # one server-sent event: a JSON chunk, or [DONE]
             "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
    generated = {**responses, 200: {"description": "the completion (JSON), or server-sent events with stream=true",
                                    "content": {"application/json": {}, "text/event-stream": {"schema": event}}}}

    @router.post("/v1/completions", responses=generated, include_in_schema=generates)
    async def completions(body: CompletionRequest):
        """Text completion of one prompt or a list of prompts (``n`` choices each)."""
        prompts = _rows(body.prompt, body.n, settings.max_inputs)
        empty = [i for i, p in enumerate(body.prompt) if not p]
        if empty:
            raise ApiError(400, "empty_input", f"prompt {empty[0]} is an empty string; send some text")
        work = Work(delta_of(body.model), prompts, _generation(body, settings, logprobs=body.logprobs, chat=False))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            def chunk(index: int, piece: str, end: Choice | None) -> dict:
                return {**head, "choices": [{"text": piece, "index": index, "logprobs": end and _completion_logprobs(end),
                                             "finish_reason": end and end.finish_reason}]}
            return await _stream(batcher, work, head, settings.timeout_s, chunk, body)
        choices = await batcher.run(COMPLETE, work)
        head["model"] = work.delta or body.model  # "auto": the delta the router chose
        return {**head, "choices": [{"text": c.text, "index": i, "logprobs": _completion_logprobs(c),
                                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": _usage(choices, body.n)}

    @router.post("/v1/chat/completions", responses=generated, include_in_schema=chats)
    async def chat(body: ChatRequest):
        """A reply to a conversation, rendered with the base tokenizer's chat template."""
        prompt = _render(engine, body)
        top = (body.top_logprobs or 0) if body.logprobs else None  # top_logprobs alone asks for nothing
        work = Work(delta_of(body.model), _rows([prompt], body.n, settings.max_inputs),
                    _generation(body, settings, logprobs=top, chat=True))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": body.model}
        if body.stream:
            started: set[int] = set()

            def chunk(index: int, piece: str, end: Choice | None) -> dict:
                delta = {"content": piece} if piece or end is None else {}
                if index not in started:
                    started.add(index)
                    delta = {"role": "assistant", **delta}
                return {**head, "choices": [{"index": index, "delta": delta, "logprobs": end and _chat_logprobs(end),
                                             "finish_reason": end and end.finish_reason}]}
            return await _stream(batcher, work, head, settings.timeout_s, chunk, body)
        choices = await batcher.run(COMPLETE, work)
        head["model"] = work.delta or body.model  # "auto": the delta the router chose
        return {**head, "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                             "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason}
                            for i, c in enumerate(choices)],
                "usage": _usage(choices, body.n)}

    return router


def _rows(prompts: list[str], n: int, limit: int) -> list[str]:
    """Each prompt ``n`` times in a row (one row per choice); 400 when empty, 413 beyond ``limit`` rows."""
    if not prompts:
        raise ApiError(400, "empty_input", "prompt is empty; send at least one text")
    rows = [p for p in prompts for _ in range(n)]
    if len(rows) > limit:
        raise ApiError(413, "too_many_inputs", f"{len(prompts)} prompt(s) x n={n} make {len(rows)} choices; at most "
                       f"{limit} per request, split it into several requests", limit=limit)
    return rows


def _generation(body: Sampled, settings, *, logprobs: int | None, chat: bool) -> Generation:
    tokens = body.new_tokens(settings.max_tokens)
    if tokens > settings.max_tokens:
        raise ApiError(400, "max_tokens_too_large", f"max_tokens {tokens} is more than this server allows "
                       f"({settings.max_tokens}); ask for fewer", limit=settings.max_tokens)
    return Generation(max_tokens=tokens, temperature=body.temperature, top_p=body.top_p,
                      top_k=max(0, body.top_k), stop=tuple(body.stop or ()), seed=body.seed, logprobs=logprobs,
                      presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, n=body.n,
                      chat=chat)


def _render(engine: Engine, body: ChatRequest) -> str:
    """The conversation as the base model's prompt, through its tokenizer's chat template."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "no_chat_template", f"the base model {engine.model_name!r} has no chat template; "
                       f"use /v1/completions with a plain prompt")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - a template's own error (say, roles out of order)
        raise ApiError(400, "chat_template_error", f"the chat template refused these messages: {error}") from None


def _usage(choices: list[Choice], n: int) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[::n])  # each prompt counts once, whatever n
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(choice: Choice) -> dict | None:
    if choice.logprobs is None:
        return None
    tokens = choice.logprobs
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [dict(t.top) for t in tokens], "text_offset": [t.offset for t in tokens]}


def _chat_logprobs(choice: Choice) -> dict | None:
    if choice.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(*alt) for alt in t.top]}
                        for t in choice.logprobs]}


async def _stream(batcher: Batcher, work: Work, head: dict, timeout: float,
                  chunk: Callable[[int, str, Choice | None], dict], body: Sampled) -> StreamingResponse:
    """Server-sent events of the generation; errors before the first token answer with their status,
    later ones in-band. The job is marked abandoned when the client goes away, which stops its rows."""
    events: asyncio.Queue = asyncio.Queue()
    job: Job = batcher.submit(COMPLETE, work, lambda choice, piece, end: events.put_nowait((choice, piece, end)))
    job.future.add_done_callback(lambda _: events.put_nowait(None))  # after every piece: see Batcher._run
    deadline = asyncio.get_running_loop().time() + timeout

    async def next_event():
        try:
            return await asyncio.wait_for(events.get(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            job.abandoned = True
            raise ApiError(504, "timeout", f"no answer within {timeout:g} s (the server's --timeout)") from None

    try:
        first = await next_event()
    except BaseException:
        job.abandoned = True
        raise
    if first is None and job.future.exception() is not None:
        raise job.future.exception()

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    async def events_out():
        item = first
        try:
            while item is not None:
                yield event(chunk(*item))
                item = await next_event()
            if job.future.exception() is not None:
                raise job.future.exception()
            if body.stream_options is not None and body.stream_options.include_usage:
                yield event({**head, "choices": [], "usage": _usage(job.future.result(), body.n)})
        except ApiError as error:
            yield event(error.body())
        except Exception as error:  # noqa: BLE001 - the stream has started: report in-band
            yield event(as_api_error(error).body())
        finally:
            job.abandoned = not job.future.done()  # the client went away mid-stream: stop its rows
        yield "data: [DONE]\n\n"

    return StreamingResponse(events_out(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
