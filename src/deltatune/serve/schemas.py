"""Request bodies of the server's endpoints; unknown fields and wrong types are refused (422)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

#: a list of texts; a single string is a list of one
Texts = Annotated[list[str], BeforeValidator(lambda value: [value] if isinstance(value, str) else value)]


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: texts to label with one delta's classifier (``null``: the base)."""

    model_config = ConfigDict(extra="forbid")

    delta: str | None = Field(None, description="a delta name in the deltas folder, or null / 'base' for the base")
    inputs: Texts = Field(..., description="the texts to classify (a string is one text)")


class CompletionRequest(BaseModel):
    """``POST /v1/completions`` in the OpenAI completions shape."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="'base' or a delta name")
    prompt: Texts = Field(..., description="one prompt, or a list of prompts (one choice each)")
    max_tokens: int = Field(16, ge=1, description="most new tokens per prompt")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy decoding; above 0: sampling")
    stream: bool = Field(False, description="send the text as server-sent events while it is generated")
