"""peft adapter folders on disk: file names, key prefixes, task types, reading and writing.

peft 0.21.2 writes ``adapter_config.json`` (its config's fields) and
``adapter_model.safetensors``, whose keys start with ``base_model.model.`` (adapters on
modules) or ``base_model.`` (modules saved next to a prompt-learning table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, Field, ValidationError
from torch import nn

from ..core.typecheck import STRICT, validation_message
from ..errors import DeltaFileError
from ..io.atomic import atomic_path, write_text_atomic

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: where peft's tensor keys put the model: adapters on modules, and prompt learning's saved modules
MODEL_PREFIX = "base_model.model."
PROMPT_LEARNING_PREFIX = "base_model."
#: safetensors metadata entry holding the deltatune config an export came from
METADATA_KEY = "deltatune_config"
#: safetensors metadata entry holding what the exported delta means (label names, task)
MEANING_KEY = "deltatune_meaning"
#: deltatune's task for peft's task types that have one
PEFT_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}
#: modules peft's task-specific models always add to modules_to_save
TASK_SAVED_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                      "QUESTION_ANS": ("qa_outputs",)}


def task_type(model: nn.Module) -> str | None:
    """peft's ``task_type`` for a transformers model, from its class name (``None`` if unknown)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM")):
        if name.endswith(suffix):
            return task
    if getattr(config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")):
        return "SEQ_2_SEQ_LM"
    if config is not None and name.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None


class PeftAdapterConfig(BaseModel):
    """The fields of ``adapter_config.json`` an import reads, with the types peft writes. Other
    fields are peft options, each accepted or refused by name (``PeftCodec.check_options``)."""

    model_config = STRICT

    peft_type: str
    task_type: str | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    modules_to_save: list[str] | None = None
    # LoRA (OFT writes r = 0 for "blocks from oft_block_size"; a LoRA with r = 0 is refused by LoRAConfig)
    r: Annotated[int, Field(ge=0)] = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    #: LoRA: a rank per module pattern; AdaLoRA: the kept singular values per module (booleans)
    rank_pattern: dict[str, Annotated[int, Field(gt=0)] | list[bool]] | None = None
    # (IA)3
    feedforward_modules: str | list[str] | None = None
    # prompt tuning
    num_virtual_tokens: int | None = None
    num_transformer_submodules: int | None = None
    prompt_tuning_init_text: str | None = None


def read_peft_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a peft adapter folder, checked against :class:`PeftAdapterConfig`.

    Raises:
        DeltaFileError: the file is missing, not JSON, not a peft config, or a field it needs has
            the wrong type (the message names it).
    """
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise DeltaFileError(f"{path} not found; a peft adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, too deep, a number too long
        raise DeltaFileError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise DeltaFileError(f"{path} is not a peft adapter config (it has no 'peft_type')")
    try:
        PeftAdapterConfig.model_validate(config)
    except ValidationError as error:
        raise DeltaFileError(validation_message(error, PeftAdapterConfig, config, str(path),
                                                "the file is corrupt or was edited by hand; save the adapter again")) from None
    return config


def read_peft_tensors(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a peft adapter's safetensors file (never a pickled ``.bin``)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        pickled = " (only adapter_model.bin is there: deltatune reads no pickle files; re-save it in peft with " \
                  "safe_serialization=True)" if (Path(directory) / "adapter_model.bin").is_file() else ""
        raise DeltaFileError(f"{path} not found{pickled}")
    try:
        with safetensors.safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # noqa: BLE001  (safetensors raises its own error types)
        raise DeltaFileError(f"{path} cannot be read as safetensors: {error}") from None
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise DeltaFileError(f"tensor {key!r} in {path} holds NaN or inf; the adapter is unusable")
    return tensors, metadata


def strip_prefixes(tensors: dict[str, torch.Tensor], prompt_learning: bool,
                   tuner_keys: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Tensor keys relative to the model: peft's ``base_model.model.`` (``base_model.``) removed;
    ``tuner_keys`` are names peft keeps on its tuner (``base_model.<name>``), kept as ``<name>``."""
    prefix = PROMPT_LEARNING_PREFIX if prompt_learning else MODEL_PREFIX
    out = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            out[key[len(prefix):]] = value
        elif key.startswith(PROMPT_LEARNING_PREFIX) and key[len(PROMPT_LEARNING_PREFIX):] in tuner_keys:
            out[key[len(PROMPT_LEARNING_PREFIX):]] = value
        elif prompt_learning and "." not in key:
            out[key] = value
        else:
            raise DeltaFileError(f"peft tensor {key!r} does not start with {prefix!r}; is this a peft adapter file?")
    return out


def write_adapter(directory: Path, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str]) -> None:
    """Write the two files of a peft adapter folder, each atomically."""
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    write_text_atomic(directory / ADAPTER_CONFIG, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")


def peft_wrapped(names: list[str], patterns: list[str] | tuple[str, ...]) -> list[str]:
    """The modules peft's ``modules_to_save`` rule picks (a name ending in a pattern), outermost only."""
    picked = [n for n in names if any(n.endswith(p) for p in patterns)]
    return [n for n in picked if not any(n.startswith(other + ".") for other in picked)]
