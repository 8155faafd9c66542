"""``deltatune serve`` completions over real HTTP (OpenAI shape, server-sent events).

Reference: ``model.generate`` on one prompt at a time, with the delta active via ``dt.using``,
on a separately loaded base.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from serve_helpers import assert_error, post_concurrently, save_random_deltas

import deltatune as dt
from deltatune.serve import DeltaLibrary, Settings, create_app, engine_from_options, load_base
from deltatune.serve import batcher as batcher_module
from deltatune.serve.background import running
from deltatune.serve.completions import complete

PROMPTS = ["the movie was", "what is a good film", "yes"]
LM_DELTAS = {"g_lora": dt.LoRAConfig(r=4), "g_ia3": dt.IA3Config()}


@pytest.fixture(scope="module")
def lm_setup(tiny_llama, tmp_path_factory):
    deltas = tmp_path_factory.mktemp("lm-deltas")
    model, tokenizer, _ = load_base(str(tiny_llama), DeltaLibrary(deltas))
    save_random_deltas(model, deltas, LM_DELTAS, seed=3)
    for name in LM_DELTAS:
        dt.load(model, deltas / name, name, activate=False)
    engine = engine_from_options(str(tiny_llama), deltas)
    app = create_app(engine, Settings(max_wait_ms=20, max_tokens=16))
    with running(app) as url:
        yield {"url": url, "reference": model, "tokenizer": tokenizer, "engine": engine}


def reference_completion(setup, delta: str | None, prompt: str, max_tokens: int) -> str:
    model, tokenizer = setup["reference"], setup["tokenizer"]
    ids = tokenizer(prompt, return_tensors="pt")
    eos = model.generation_config.eos_token_id
    context = dt.base_only(model) if delta is None else dt.using(model, delta)
    with context, torch.no_grad():
        out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    new = new[: new.index(eos) + 1] if eos in new else new
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_greedy_completions_equal_generate_run_per_prompt_and_delta(lm_setup):
    models = ["base", *LM_DELTAS]
    payloads = [{"model": m, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0} for m in models]
    responses = post_concurrently(lm_setup["url"], "/v1/completions", payloads)
    check_against_generate(lm_setup, models, responses)


def check_against_generate(lm_setup, models: list[str], responses: list[httpx.Response]) -> None:
    for model, response in zip(models, responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion" and body["model"] == model
        delta = None if model == "base" else model
        texts = [choice["text"] for choice in sorted(body["choices"], key=lambda c: c["index"])]
        assert texts == [reference_completion(lm_setup, delta, p, 8) for p in PROMPTS]
        assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert len({tuple(c["text"] for c in r.json()["choices"]) for r in responses}) > 1  # the deltas change the text


def test_completions_for_different_deltas_share_one_generate_batch(lm_setup, monkeypatch):
    batches = []

    def slow_complete(engine, works, on_text=None, cancelled=None):
        batches.append(sorted(str(w.delta) for w in works))
        time.sleep(0.3)  # keeps the worker busy while the others queue up
        return complete(engine, works, on_text, cancelled)

    monkeypatch.setattr(batcher_module, "complete", slow_complete)
    models = ["base", *LM_DELTAS]

    async def main():
        async with httpx.AsyncClient(base_url=lm_setup["url"], timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/completions", json={"model": "g_lora", "prompt": "yes",
                                                                            "temperature": 0.7, "top_p": 0.9}))
            await asyncio.sleep(0.1)
            rest = [http.post("/v1/completions", json={"model": m, "prompt": PROMPTS, "max_tokens": 8, "temperature": 0})
                    for m in models]
            return await asyncio.gather(first, *rest)

    responses = asyncio.run(main())
    assert batches == [["g_lora"], ["None", "g_ia3", "g_lora"]]
    check_against_generate(lm_setup, models, responses[1:])


def test_streaming_yields_the_same_text_as_non_streaming(lm_setup):
    payload = {"model": "g_lora", "prompt": PROMPTS, "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=lm_setup["url"], timeout=30) as http:
        plain = [c["text"] for c in sorted(http.post("/v1/completions", json=payload).json()["choices"],
                                            key=lambda c: c["index"])]
        streamed, finished, lines = [""] * len(PROMPTS), [None] * len(PROMPTS), []
        with http.stream("POST", "/v1/completions", json={**payload, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        choice = json.loads(line.removeprefix("data: "))["choices"][0]
        streamed[choice["index"]] += choice["text"]
        finished[choice["index"]] = choice["finish_reason"] or finished[choice["index"]]
    assert streamed == plain
    assert all(f in ("stop", "length") for f in finished)
    assert len(lines) > len(PROMPTS) + 1  # more than one chunk per prompt: it streamed


def test_sampled_completions_run(lm_setup):
    with httpx.Client(base_url=lm_setup["url"], timeout=30) as http:
        body = http.post("/v1/completions", json={"model": "g_ia3", "prompt": "yes", "max_tokens": 4,
                                                   "temperature": 0.9}).json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 4


BAD_COMPLETIONS = [
    pytest.param({"model": "nosuch", "prompt": "yes"}, 404, "unknown_delta", id="unknown-model"),
    pytest.param({"model": "..", "prompt": "yes"}, 400, "invalid_delta_name", id="traversal"),
    pytest.param({"model": "base", "prompt": []}, 400, "empty_input", id="no-prompt"),
    pytest.param({"model": "base", "prompt": ""}, 400, "empty_input", id="empty-prompt"),
    pytest.param({"model": "base", "prompt": "yes", "max_tokens": 17}, 400, "max_tokens_too_large", id="max-tokens"),
    pytest.param({"model": "base", "prompt": "yes " * 120, "max_tokens": 16}, 413, "input_too_long", id="context"),
    pytest.param({"model": "base", "prompt": "yes", "temperature": -1}, 422, "invalid_request", id="temperature"),
    pytest.param({"prompt": "yes"}, 422, "invalid_request", id="no-model"),
]


@pytest.mark.parametrize(("payload", "status", "kind"), BAD_COMPLETIONS)
def test_bad_completion_requests_get_json_errors(lm_setup, payload, status, kind):
    with httpx.Client(base_url=lm_setup["url"], timeout=30) as http:
        error = assert_error(http.post("/v1/completions", json=payload), status, kind)
        if kind in ("max_tokens_too_large", "input_too_long"):
            assert error["limit"] == (16 if kind == "max_tokens_too_large" else 128)
        streamed = http.post("/v1/completions", json={**payload, "stream": True})
        assert_error(streamed, status, kind)  # refused before the stream starts: a real status
        assert http.post("/v1/completions", json={"model": "base", "prompt": "yes", "max_tokens": 2}).status_code == 200


def test_classify_on_a_causal_lm_is_a_wrong_task(lm_setup):
    with httpx.Client(base_url=lm_setup["url"], timeout=30) as http:
        assert_error(http.post("/v1/classify", json={"inputs": ["yes"]}), 400, "wrong_task")
