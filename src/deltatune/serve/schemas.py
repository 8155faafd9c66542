"""Request bodies of the server's endpoints; unknown fields and wrong types are refused (422).

The completion and chat bodies take the OpenAI fields the server implements (the subset vLLM
serves); any other field is refused by name, never ignored. Every limit the server enforces
is stated here, so it is in the OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .library import NAME_RULE

#: the longest text and model name the server accepts (the schema states them)
MAX_TEXT = 100_000
#: a delta name (the deltas folder's rule; ``base`` means the base model)
NAME_PATTERN = f"^{NAME_RULE}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, max_length=64)]
#: a delta name or the base's id (as ``/v1/models`` lists it)
Model = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
#: a list of texts; a single string is a list of one
Texts = Annotated[list[Text], BeforeValidator(lambda value: [value] if isinstance(value, str) else value,
                                              json_schema_input_type=str | list[str])]
Stop = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]],
                 BeforeValidator(lambda value: [value] if isinstance(value, str) else value), Field(max_length=4)]


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: texts to label with one delta's classifier (``null``: the base)."""

    model_config = ConfigDict(extra="forbid")

    delta: Name | None = Field(None, description="a delta name in the deltas folder, or null / 'base' for the base")
    inputs: Texts = Field(..., description="the texts to classify (a string is one text)")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="send a last chunk with the token counts")


class Sampled(BaseModel):
    """The generation fields completions and chat share (OpenAI's meaning for each)."""

    model_config = ConfigDict(extra="forbid")

    model: Model = Field(..., description="a delta name, or the base (its id in /v1/models, or 'base')")
    max_tokens: int | None = Field(None, ge=1, description="most new tokens per choice (default 16, or the "
                                                           "server's --max-tokens if lower)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (the newer name; "
                                                                      "it wins when both are sent)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy decoding; above 0: sampling")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="sample from the smallest set of tokens whose "
                                                          "probabilities add up to top_p")
    top_k: int = Field(0, ge=-1, description="sample from the top_k most likely tokens (0 or -1: all)")
    n: int = Field(1, ge=1, le=16, description="choices per prompt; prompts x n may not exceed the server's "
                                               "--max-inputs (413 with the limit)")
    stop: Stop | None = Field(None, description="up to 4 strings that end a choice; the stop string is not returned")
    seed: int | None = Field(None, ge=-(2 ** 53), le=2 ** 53,  # integers JSON numbers hold exactly
                             description="the same request with the same seed gives the same text, "
                                         "alone or batched with others")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = Field(False, description="send the text as server-sent events while it is generated")
    stream_options: StreamOptions | None = None

    def new_tokens(self, limit: int) -> int:
        """The tokens asked for: ``max_completion_tokens``, else ``max_tokens``, else 16 (or the server's limit)."""
        return self.max_completion_tokens or self.max_tokens or min(16, limit)


class CompletionRequest(Sampled):
    """``POST /v1/completions`` in the OpenAI completions shape."""

    prompt: Texts = Field(..., description="one prompt, or a list of prompts (n choices each)")
    logprobs: int | None = Field(None, ge=0, le=20, description="the log-probabilities of the chosen token and "
                                                                "of this many most likely ones, per position")


class Message(BaseModel):
    """One chat message; ``content`` as a string (or a list of text parts)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | list[TextPart]
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class ChatRequest(Sampled):
    """``POST /v1/chat/completions`` in the OpenAI chat shape."""

    messages: list[Message] = Field(..., min_length=1, max_length=256, description="the conversation so far")
    logprobs: bool = Field(False, description="return the log-probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs=true: this many most likely "
                                                                    "tokens per position (ignored without it)")


Message.model_rebuild()
