"""How a question is put to a chat model: its chat template, or a plain question/answer frame."""

from __future__ import annotations


def chat_prompt(tokenizer, question: str) -> str:
    """The prompt a chat model sees for a question (its chat template where it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return f"Question: {question}\nAnswer: "
