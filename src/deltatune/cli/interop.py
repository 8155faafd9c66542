"""``deltatune export`` and ``deltatune import``: deltas to and from peft adapter folders.

Both need the base model: export to tell each adapted module's kind (peft names Linear,
``Conv1D`` and Embedding tensors differently) and check the delta fits it, import to record
the base's fingerprint. It comes from ``--model``, else from the delta's record (the
``--model`` it was trained with) or the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.registry import config_from_dict
from ..errors import ConfigError
from ..interop.peft import export_peft, import_peft
from ..interop.peft_files import ADAPTER_WEIGHTS, read_peft_config
from ..interop.peft_methods import check_exportable, codec_for_peft_type
from ..io.artifact import read_meta
from ..io.base_check import CHECKS
from ..models.load import MODELS, model_folder

FORMATS = ("peft",)
#: the transformers class peft's task type stands for
TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "CAUSAL_LM": "AutoModelForCausalLM",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "FEATURE_EXTRACTION": "AutoModel"}
#: a saved classification head's output weight: its first dimension is the number of labels
HEAD_WEIGHTS = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


def num_labels(shapes: dict[str, list[int]]) -> int | None:
    """The label count of a saved classification head among tensor names (peft's or deltatune's) and shapes."""
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.").removeprefix("base_model.").replace(".copy.", ".")
        if name in HEAD_WEIGHTS:
            return shape[0]
    return None


def load_base(name: str, class_name: str, labels: int | None):
    """The base model ``name`` (a packaged model or a local folder) as transformers class ``class_name``."""
    import torch
    import transformers
    from transformers.utils import logging

    folder = model_folder(name)
    model_class = getattr(transformers, class_name, None)
    if model_class is None or not hasattr(model_class, "from_pretrained"):
        raise ConfigError(f"transformers has no model class {class_name!r} to load the base {name!r} with; load it "
                          f"in Python and call deltatune.interop.export_peft / import_peft with the model")
    options = {"num_labels": labels} if labels and "Classification" in class_name else {}
    logging.set_verbosity_error()
    return model_class.from_pretrained(folder, dtype=torch.float32, **options).eval()


def _base_name(given: str | None, recorded: str | None, where: str) -> str:
    name = given or recorded
    if name and (given or name in MODELS or (Path(name) / "config.json").is_file()):
        return name
    found = f"{where} names {recorded!r}, which is neither a packaged model nor a local folder" if recorded \
        else f"{where} does not name it"
    raise ConfigError(f"the base model is needed and {found}; pass --model NAME_OR_FOLDER")


def _export(args: argparse.Namespace) -> int:
    meta = read_meta(args.directory)
    codec = check_exportable(config_from_dict(meta["config"]))  # refuse before loading any model
    name = _base_name(args.model, meta.get("provenance", {}).get("model"), f"{args.directory}/delta.json")
    shapes = {key: info["shape"] for key, info in meta["tensors"].items()}
    model = load_base(name, meta["base"]["model_class"], num_labels(shapes))
    out = export_peft(args.directory, args.out, model, check=args.check,
                      base_model_name_or_path=str(model_folder(name).resolve()))
    print(f"wrote {out}/ (adapter_config.json, adapter_model.safetensors): peft {codec.peft_type} adapter of the "
          f"{meta['method']} delta {meta['name']!r}; load it with peft.PeftModel.from_pretrained(base, {str(out)!r})")
    return 0


def _import(args: argparse.Namespace) -> int:
    import safetensors

    peft_config = read_peft_config(args.directory)
    codec_for_peft_type(peft_config.get("peft_type")).check_options(peft_config)  # refuse before loading any model
    name = _base_name(args.model, peft_config.get("base_model_name_or_path"), f"{args.directory}/adapter_config.json")
    class_name = TASK_CLASSES.get(peft_config.get("task_type") or "")
    mapping = peft_config.get("auto_mapping") or {}
    if class_name is None and str(mapping.get("parent_library", "")).startswith("transformers"):
        class_name = mapping.get("base_model_class")
    shapes = {}
    weights = Path(args.directory) / ADAPTER_WEIGHTS
    if weights.is_file():
        with safetensors.safe_open(str(weights), "pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    model = load_base(name, class_name or _architecture(name), num_labels(shapes))
    out = import_peft(args.directory, args.out, model, name=args.name)
    meta = json.loads((out / "delta.json").read_text())
    print(f"wrote {out}/ (delta.safetensors, delta.json): {meta['method']} delta {meta['name']!r} on "
          f"{len(meta['sites'])} module(s){', with ' + ', '.join(meta['modules_to_save']) if meta['modules_to_save'] else ''}, "
          f"for the base {name}")
    return 0


def _architecture(name: str) -> str:
    """The class a model folder's config names, else ``AutoModel``."""
    config = json.loads((model_folder(name) / "config.json").read_text())
    return (config.get("architectures") or ["AutoModel"])[0]


def add_parsers(commands) -> None:
    export = commands.add_parser("export", help="write a delta as another library's adapter folder (peft)")
    export.add_argument("directory", help="a delta folder (delta.json + delta.safetensors)")
    export.add_argument("--format", choices=FORMATS, required=True, help="the adapter format to write")
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--model", default=None, help="the base: minilm, smollm2 or a local transformers folder "
                                                       "(default: the model the delta was trained with)")
    export.add_argument("--check", choices=CHECKS, default="base",
                        help="what to do if the base's fingerprint differs from the delta's: base (default) refuses "
                             "another base and warns for the same base at another precision; strict refuses both")
    export.set_defaults(run=_export)
    imported = commands.add_parser("import", help="turn another library's adapter folder (peft) into a delta")
    imported.add_argument("directory", help="a peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    imported.add_argument("--format", choices=FORMATS, required=True, help="the adapter format to read")
    imported.add_argument("--out", required=True, help="the delta folder to write")
    imported.add_argument("--model", default=None, help="the base: minilm, smollm2 or a local transformers folder "
                                                         "(default: the adapter's base_model_name_or_path)")
    imported.add_argument("--name", default="default", help="the delta's name")
    imported.set_defaults(run=_import)
