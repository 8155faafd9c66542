"""The official ``openai`` client against ``deltatune serve`` on loopback: every field we serve.

References are computed offline on a separately loaded base: ``model.generate`` for greedy
text, and a naive loop (the whole sequence re-run per token, no cache) for log-probabilities
and penalties.
"""

from __future__ import annotations

import shutil
import time

import httpx
import openai
import pytest
import torch
from serve_helpers import post_concurrently, save_random_deltas

import deltatune as dt
from deltatune.serve import DeltaLibrary, Settings, create_app, engine_from_options, load_base
from deltatune.serve.background import running

DELTAS = {"lora": dt.LoRAConfig(r=4), "ia3": dt.IA3Config()}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}a {% endif %}")


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, folder)
    deltas = tmp_path_factory.mktemp("sdk-deltas")
    model, tokenizer, _ = load_base(str(folder), DeltaLibrary(deltas))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    save_random_deltas(model, deltas, DELTAS, seed=5)
    for name in DELTAS:
        dt.load(model, deltas / name, name, activate=False)
    engine = engine_from_options(str(folder), deltas)
    app = create_app(engine, Settings(max_wait_ms=20, max_tokens=24))
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield {"client": client, "url": url, "model": model, "tokenizer": tokenizer, "base": str(folder),
               "engine": engine}


def _context(setup, delta):
    return dt.base_only(setup["model"]) if delta in (None, "base") else dt.using(setup["model"], delta)


def greedy_reference(setup, delta, prompt: str, max_tokens: int, chat: bool = False) -> list[int]:
    """``model.generate``'s greedy tokens for one prompt, up to and including end-of-sequence."""
    model, tokenizer = setup["model"], setup["tokenizer"]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not chat)
    eos = model.generation_config.eos_token_id
    with _context(setup, delta), torch.no_grad():
        out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def naive_loop(setup, delta, prompt: str, steps: int, presence=0.0, frequency=0.0):
    """Greedy decoding re-running the whole sequence each step; the raw log-probabilities of each step."""
    model, tokenizer = setup["model"], setup["tokenizer"]
    ids = tokenizer(prompt)["input_ids"]
    tokens, logprobs = [], []
    with _context(setup, delta), torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float()
            logprobs.append(torch.log_softmax(logits, -1))
            penalised = logits.clone()
            for token in set(tokens):
                penalised[token] -= tokens.count(token) * frequency + presence
            tokens.append(int(penalised.argmax()))
    return tokens, logprobs


def decode(setup, tokens):
    return setup["tokenizer"].decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_models_list_the_base_and_every_delta_with_its_parent(server):
    cards = {m.id: m for m in server["client"].models.list().data}
    assert set(cards) == {server["base"], *DELTAS}
    assert all(cards[name].parent == server["base"] and cards[name].owned_by == "deltatune" for name in DELTAS)
    assert server["client"].models.retrieve("lora").id == "lora"
    with pytest.raises(openai.NotFoundError, match="no delta 'nosuch'"):
        server["client"].models.retrieve("nosuch")


@pytest.mark.parametrize("model", ["base", "lora", "ia3"])
def test_greedy_completions_equal_generate_per_prompt(server, model):
    prompts = ["the movie was", "what is a good film"]
    answer = server["client"].completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0)
    for i, prompt in enumerate(prompts):
        tokens = greedy_reference(server, model, prompt, 10)
        choice = answer.choices[i]
        assert choice.index == i and choice.text == decode(server, tokens)
        assert choice.finish_reason == ("stop" if len(tokens) < 10 else "length")
    prompt_tokens = sum(len(server["tokenizer"](p)["input_ids"]) for p in prompts)
    assert answer.usage.prompt_tokens == prompt_tokens
    assert answer.usage.completion_tokens == sum(len(greedy_reference(server, model, p, 10)) for p in prompts)


def test_streamed_completion_adds_up_to_the_whole_one(server):
    client = server["client"]
    whole = client.completions.create(model="lora", prompt="yes", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="lora", prompt="yes", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_renders_the_template_and_equals_generate(server):
    messages = [{"role": "system", "content": "good"}, {"role": "user", "content": "what is a good film"}]
    answer = server["client"].chat.completions.create(model="ia3", messages=messages, max_completion_tokens=9,
                                                      temperature=0)
    prompt = server["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tokens = greedy_reference(server, "ia3", prompt, 9, chat=True)
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == decode(server, tokens)
    assert answer.usage.prompt_tokens == len(server["tokenizer"](prompt, add_special_tokens=False)["input_ids"])
    stream = server["client"].chat.completions.create(model="ia3", messages=messages, max_tokens=9, temperature=0,
                                                      stream=True)
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_max_tokens_and_length_finish(server):
    client = server["client"]
    for options in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        answer = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "yes"}],
                                                temperature=0, frequency_penalty=-2.0, **options)  # no early stop
        assert answer.usage.completion_tokens == 3 and answer.choices[0].finish_reason == "length"


def test_stop_strings_end_the_text_and_are_not_returned(server):
    client = server["client"]
    full = client.completions.create(model="lora", prompt="the plot", max_tokens=16, temperature=0,
                                     frequency_penalty=-2.0).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = " " + words[2]
    expected = full[: full.index(stop)]
    for stops in (stop, [stop, "never-there"]):
        answer = client.completions.create(model="lora", prompt="the plot", max_tokens=16, temperature=0,
                                           frequency_penalty=-2.0, stop=stops)
        assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lora", prompt="the plot", max_tokens=16, temperature=0,
                                         frequency_penalty=-2.0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_mixed_batch(server):
    request = {"model": "lora", "prompt": "the movie", "max_tokens": 12, "temperature": 1.3, "seed": 1234, "n": 2}
    alone = server["client"].completions.create(**request)
    others = [{"model": m, "prompt": ["what is", "why"], "max_tokens": 12, "temperature": 0.8, "top_p": 0.9}
              for m in ("base", "ia3", "lora")]
    mixed = post_concurrently(server["url"], "/v1/completions", [*others[:2], request, others[2]])
    texts = [c.text for c in alone.choices]
    assert [c["text"] for c in mixed[2].json()["choices"]] == texts
    assert texts[0] != texts[1]  # choice j draws with seed + j
    other_seed = server["client"].completions.create(**{**request, "seed": 99})
    assert [c.text for c in other_seed.choices] != texts


def test_top_k_1_and_a_tiny_top_p_sample_the_greedy_token(server):
    client = server["client"]
    greedy = client.completions.create(model="ia3", prompt="good", max_tokens=8, temperature=0).choices[0].text
    for options in ({"extra_body": {"top_k": 1}}, {"top_p": 1e-6}):
        sampled = client.completions.create(model="ia3", prompt="good", max_tokens=8, temperature=1.5, seed=3,
                                            **options)
        assert sampled.choices[0].text == greedy


def test_completion_logprobs_equal_the_naive_loop(server):
    answer = server["client"].completions.create(model="lora", prompt="the film", max_tokens=5, temperature=0,
                                                 logprobs=3, frequency_penalty=-2.0)
    tokens, reference = naive_loop(server, "lora", "the film", 5, frequency=-2.0)
    logprobs = answer.choices[0].logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text == decode(server, tokens)
    for step, token in enumerate(tokens):
        assert logprobs.token_logprobs[step] == pytest.approx(float(reference[step][token]), abs=1e-4)
        best = torch.topk(reference[step], 3)
        top = logprobs.top_logprobs[step]
        assert len(top) == 3
        assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(tokens))]
    streamed = list(server["client"].completions.create(model="lora", prompt="the film", max_tokens=5, temperature=0,
                                                        logprobs=3, frequency_penalty=-2.0, stream=True))
    assert [c.choices[0].logprobs for c in streamed[:-1]] == [None] * (len(streamed) - 1)
    assert streamed[-1].choices[0].logprobs.token_logprobs == logprobs.token_logprobs  # all of them, last chunk


def test_chat_logprobs_and_top_logprobs(server):
    answer = server["client"].chat.completions.create(model="base", messages=[{"role": "user", "content": "no"}],
                                                      max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)  # greedy: the top token
        assert entry.bytes == list(entry.token.encode())


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0), (-1.0, 0.5)])
def test_penalties_equal_the_naive_loop(server, presence, frequency):
    answer = server["client"].completions.create(model="ia3", prompt="bad", max_tokens=10, temperature=0,
                                                 presence_penalty=presence, frequency_penalty=frequency)
    tokens, _ = naive_loop(server, "ia3", "bad", 10, presence, frequency)
    eos = server["model"].generation_config.eos_token_id
    tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
    assert answer.choices[0].text == decode(server, tokens)


@pytest.mark.parametrize(("options", "field"), [({"best_of": 2}, "best_of"), ({"echo": True}, "echo"),
                                                ({"logit_bias": {"1": 5}}, "logit_bias"), ({"suffix": "x"}, "suffix")])
def test_fields_we_do_not_serve_are_refused_by_name(server, options, field):
    with pytest.raises(openai.UnprocessableEntityError, match=field):
        server["client"].completions.create(model="base", prompt="yes", max_tokens=2, **options)


def test_chat_on_a_base_without_a_template_is_a_clear_400(server, monkeypatch):
    monkeypatch.setattr(server["engine"].tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        server["client"].chat.completions.create(model="base", messages=[{"role": "user", "content": "yes"}])


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server):
    engine = server["engine"]
    steps = []

    def slow_step(module, args, kwargs):
        steps.append(time.perf_counter())
        time.sleep(0.05)

    handle = engine.model.register_forward_pre_hook(slow_step, with_kwargs=True)
    try:
        stream = server["client"].completions.create(model="base", prompt="yes", max_tokens=24, temperature=0,
                                                     frequency_penalty=-2.0, stream=True)
        next(iter(stream))
        stream.close()  # the client goes away after its first chunk
        time.sleep(2.5)  # twice what the 24 steps would take
        assert len(steps) < 12, f"{len(steps)} forward steps ran for a client that left after one chunk"
        answer = server["client"].completions.create(model="base", prompt="no", max_tokens=2)  # the server goes on
        assert answer.choices[0].text is not None
    finally:
        handle.remove()


def test_metrics_count_requests_and_generated_tokens_per_delta(server):
    def sample(text: str, name: str) -> float:
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)

    with httpx.Client(base_url=server["url"]) as http:
        before = http.get("/metrics")
        assert before.headers["content-type"].startswith("text/plain")
        answer = server["client"].completions.create(model="ia3", prompt=["yes", "no"], max_tokens=5, temperature=0)
        after = http.get("/metrics").text
    requests, tokens = 'deltatune_serve_delta_requests_total{delta="ia3"}', 'deltatune_serve_generated_tokens_total{delta="ia3"}'
    assert sample(after, requests) - sample(before.text, requests) == 1
    assert sample(after, tokens) - sample(before.text, tokens) == answer.usage.completion_tokens


@pytest.mark.parametrize("options", [{"temperature": 2.2e-309}, {"temperature": 1.5, "top_p": 2.2e-313},
                                     {"temperature": 1e-6, "top_k": 10_000}])
def test_extreme_sampling_values_decode_greedily_instead_of_failing(server, options):
    """Found by schemathesis: a subnormal temperature overflowed the logits, a subnormal top_p dropped every token."""
    greedy = server["client"].completions.create(model="base", prompt="good", max_tokens=6, temperature=0)
    answer = server["client"].completions.create(model="base", prompt="good", max_tokens=6, seed=1,
                                                 **{k: v for k, v in options.items() if k != "top_k"},
                                                 extra_body={"top_k": options.get("top_k", 0)})
    assert answer.choices[0].text == greedy.choices[0].text
