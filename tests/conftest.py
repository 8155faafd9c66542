"""Shared fixtures: tiny transformers model folders with a tokenizer, tiny CSV datasets."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ["good", "great", "fine", "love", "nice", "bad", "awful", "poor", "hate", "dull",
         "the", "movie", "film", "was", "very", "plot", "actors", "is", "a", "what", "why", "yes", "no"]


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_model_folder(folder: Path, kind: str) -> Path:
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(folder)
    torch.manual_seed(0)
    size = len(tokenizer)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=64)
        model = transformers.BertModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                          pad_token_id=0, bos_token_id=2, eos_token_id=3)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_reviews(path: Path, rows: int = 120, seed: int = 0) -> Path:
    """A tiny sentiment CSV whose label follows from its words, so it can be learned."""
    rng = random.Random(seed)
    positive, negative = WORDS[:5], WORDS[5:10]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(rows):
            label = rng.choice(["pos", "neg"])
            words = rng.sample(positive if label == "pos" else negative, 2) + rng.sample(WORDS[10:18], 3)
            rng.shuffle(words)
            writer.writerow([" ".join(words) + f" {i % 7}", label])
    return path


@pytest.fixture
def reviews_csv(tmp_path) -> Path:
    return write_reviews(tmp_path / "reviews.csv")
