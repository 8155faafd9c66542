"""Causal LM: answer-only loss, LoRA/prefix/prompt/(IA)3 training, and ``deltatune generate``."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import deltatune as dt
from conftest import WORDS
from deltatune.cli import main
from deltatune.data.datasets import load_dataset
from deltatune.models.load import load_model
from deltatune.train.batches import IGNORE, chat_prompt, encode
from deltatune.models.generate import generate_text
from deltatune.train.job import TrainJob, run_train
from deltatune.train.metrics import evaluate

POSITIVE, NEGATIVE, FILLER = WORDS[:5], WORDS[5:10], WORDS[10:18]


@pytest.fixture(scope="module")
def qa_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose WordPiece vocabulary covers the QA words and the chat prompt.

    Built here rather than with conftest's ``make_model_folder``: with transformers 5,
    ``BertTokenizerFast(vocab_file=...)`` ignores the file, so that tokenizer knows only
    its five special tokens and every word becomes [UNK].
    """
    import transformers

    folder = tmp_path_factory.mktemp("qa-llama")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", "answer", ":", *WORDS]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, eos_token="[SEP]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3, initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qa_jsonl(tmp_path_factory) -> Path:
    """Questions whose answer follows from one word: "yes" for a positive word, "no" for a negative one."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    seen = set()
    with open(path, "w") as handle:
        while len(seen) < 80:
            good = rng.random() < 0.5
            words = rng.sample(FILLER, rng.randint(1, 4)) + [rng.choice(POSITIVE if good else NEGATIVE)]
            rng.shuffle(words)
            prompt = "what " + " ".join(words)
            if prompt not in seen:
                seen.add(prompt)
                handle.write(json.dumps({"prompt": prompt, "completion": "yes" if good else "no"}) + "\n")
    return path


def _job(model: Path, data: Path, out: Path, method: str, steps: int) -> TrainJob:
    return TrainJob(model=str(model), data=str(data), method=method, out=str(out), text_column="prompt",
                    completion_column="completion", steps=steps, batch_size=16, lr=1e-2, max_length=32, progress=False)


def _train_cli(model: Path, data: Path, out: Path, method: str, steps: int = 6) -> int:
    return main(["train", "--model", str(model), "--data", str(data), "--text-column", "prompt",
                 "--completion-column", "completion", "--method", method, "--steps", str(steps), "--batch-size", "16",
                 "--max-length", "32", "--out", str(out), "--no-progress"])


@pytest.fixture(scope="module")
def lora_run(qa_llama, qa_jsonl, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "lora"
    metrics = run_train(_job(qa_llama, qa_jsonl, out, "lora", steps=60))
    return out, metrics


def test_labels_cover_only_the_answer_tokens(qa_llama, qa_jsonl):
    splits = load_dataset(str(qa_jsonl), text_column="prompt", completion_column="completion")
    tokenizer = load_model(str(qa_llama), "causal_lm").tokenizer
    examples = splits.train[:6]
    encoded = encode(examples, tokenizer, "causal_lm", 32)
    batch = encoded.collate(list(range(len(examples))))
    for row, example in enumerate(examples):
        prompt = tokenizer(chat_prompt(tokenizer, example.text), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert 1 not in prompt + answer, "every word is in the vocabulary"
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n, length = len(prompt), len(prompt) + len(answer)
        assert ids[:length].tolist() == prompt + answer
        assert (labels[:n] == IGNORE).all(), "no loss on prompt tokens"
        assert labels[n:length].tolist() == answer, "loss on every answer token and the end of sequence"
        assert (labels[length:] == IGNORE).all() and (mask[length:] == 0).all(), "no loss on padding"
    assert (batch["labels"] == IGNORE).sum() > 0 and (batch["attention_mask"] == 0).any(), "the batch is padded"


def test_prompt_tuning_pads_labels_for_its_virtual_tokens(qa_llama, qa_jsonl):
    """The loss the loop trains on equals the answer-only loss that evaluate() reports."""
    splits = load_dataset(str(qa_jsonl), text_column="prompt", completion_column="completion")
    loaded = load_model(str(qa_llama), "causal_lm")
    model = loaded.model
    dt.attach(model, dt.PromptConfig(num_virtual_tokens=4))
    encoded = encode(splits.test, loaded.tokenizer, "causal_lm", 32)
    model.eval()
    with torch.no_grad():
        batch = encoded.collate(list(range(len(encoded))))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = model(**batch).loss.item()
    assert logits.shape[1] == batch["input_ids"].shape[1] + 4
    assert loss == pytest.approx(evaluate(model, encoded, batch_size=len(encoded))["loss"], rel=1e-5)


def test_lora_lowers_the_answer_loss(qa_llama, qa_jsonl, lora_run):
    out, metrics = lora_run
    job = _job(qa_llama, qa_jsonl, out, "lora", steps=60)
    splits = load_dataset(job.data, job.seed, text_column="prompt", completion_column="completion")
    loaded = load_model(job.model, "causal_lm")
    base = evaluate(loaded.model, encode(splits.test, loaded.tokenizer, "causal_lm", job.max_length))
    assert metrics["task"] == "causal_lm" and set(metrics["test"]) == {"loss", "perplexity"}
    assert metrics["test"]["loss"] < 0.5 * base["loss"]
    assert metrics["test"]["perplexity"] < base["perplexity"]
    assert json.loads((out / "metrics.json").read_text())["test"] == metrics["test"]
    # the job records the base model's test loss, measured before the delta was attached
    assert metrics["base_test"]["loss"] == pytest.approx(base["loss"], rel=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3"])
def test_other_methods_train_on_a_causal_lm(tmp_path, qa_llama, qa_jsonl, method):
    assert _train_cli(qa_llama, qa_jsonl, tmp_path / method, method) == 0
    metrics = json.loads((tmp_path / method / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["task"] == "causal_lm"
    assert metrics["test"]["loss"] > 0 and metrics["test"]["perplexity"] > 1
    assert dt.read_meta(tmp_path / method)["method"] == method


def test_generate_shows_base_and_tuned_answers(qa_llama, lora_run, capsys):
    out, _ = lora_run
    question = "what the movie was great"
    assert main(["generate", "--model", str(qa_llama), "--delta", str(out), "--prompt", question,
                 "--prompt", "what the film was awful", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    lines = [line.strip() for line in printed.splitlines()]
    assert lines.count(f"prompt: {question}") == 1 and "prompt: what the film was awful" in lines
    first = lines.index(f"prompt: {question}")
    assert lines[first + 1].startswith("base:") and lines[first + 2].startswith("tuned:")
    tuned = lines[first + 2].removeprefix("tuned:").strip()

    loaded = load_model(str(qa_llama), "causal_lm")
    dt.load(loaded.model, out)
    expected = generate_text(loaded.model, loaded.tokenizer, question, max_new_tokens=4, temperature=0)
    assert tuned == expected and expected in ("yes", "no"), "the tuned model answers in the trained format"
    with dt.base_only(loaded.model):
        base = generate_text(loaded.model, loaded.tokenizer, question, max_new_tokens=4, temperature=0)
    assert lines[first + 1].removeprefix("base:").strip() == base != expected


@pytest.mark.parametrize("config", [dt.PromptConfig(num_virtual_tokens=3), dt.PrefixConfig(num_virtual_tokens=3)],
                         ids=["prompt", "prefix"])
def test_generate_text_with_virtual_tokens_equals_greedy_recompute(qa_llama, config):
    loaded = load_model(str(qa_llama), "causal_lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    dt.attach(model, config)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "default"):
            p.mul_(3.0)
    question = "what the plot was good"
    ids = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    model.eval()
    with torch.no_grad():
        for _ in range(5):
            next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    expected = tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()
    assert generate_text(model, tokenizer, question, max_new_tokens=5) == expected


def test_generate_needs_a_prompt_and_a_delta(qa_llama, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(qa_llama), "--delta", "x"])
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(qa_llama), "--prompt", "what"])
    assert main(["generate", "--model", str(qa_llama), "--delta", "nowhere", "--prompt", "what"]) == 2


def test_causal_evaluation_batches_keep_the_logits_small_and_give_the_same_loss(qa_llama, qa_jsonl, monkeypatch):
    from deltatune.train import metrics

    loaded = load_model(str(qa_llama), "causal_lm")
    data = encode(load_dataset(str(qa_jsonl), 0, text_column="prompt", completion_column="completion").test,
                  loaded.tokenizer, "causal_lm", 64)
    longest, vocab = max(len(x) for x in data.input_ids), loaded.model.get_output_embeddings().weight.shape[0]
    assert metrics.causal_rows(loaded.model, data) == min(64, metrics.LOGITS_BUDGET // (4 * longest * vocab))
    whole = evaluate(loaded.model, data)
    monkeypatch.setattr(metrics, "LOGITS_BUDGET", 4 * longest * vocab)  # one row per batch
    assert metrics.causal_rows(loaded.model, data) == 1
    assert evaluate(loaded.model, data)["loss"] == pytest.approx(whole["loss"], rel=1e-6)
