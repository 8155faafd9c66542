"""The schema of ``delta.json``, checked before any of its fields is used, and its seal.

Every field :func:`deltatune.save` writes and something reads has a type here; a value of
another type, or a missing required field, is a :class:`DeltaFileError` naming the field, the
expected type and the value. ``config`` is an object here and is checked field by field
against its method's config class when it is built (``DeltaConfig.from_dict``).

Unknown members are allowed (and kept) everywhere: a file from a newer deltatune that only
adds fields still loads; a change an older deltatune must not misread bumps ``schema_version``,
which :func:`deltatune.read_meta` refuses when it is newer than it knows.

The seal, ``description_sha256``, is the SHA-256 of the fields that decide what a load
builds (:data:`SEALED`, as canonical JSON). ``tensors_sha256`` protects the tensor file, the
seal protects the description: a changed ``alpha`` would otherwise load silently with other
outputs. Files written before the seal existed have none and are read as before.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import AfterValidator, BaseModel, Field, ValidationError

from ..core.typecheck import STRICT, validation_message
from ..errors import DeltaFileError

FORMAT = "deltatune.delta"
#: the fields the seal covers: everything that decides which units a load builds and what they hold
SEALED = ("format", "schema_version", "method", "config", "sites", "modules_to_save", "tensors", "tensors_sha256",
          "compression")
FIX = "the file is corrupt or was edited by hand; save the delta again"


def _dtype_name(name: str) -> str:
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise ValueError(name)
    return name


Count = Annotated[int, Field(ge=0)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="a SHA-256 digest (64 hex digits)")]
DtypeName = Annotated[str, AfterValidator(_dtype_name), Field(description="a torch dtype name such as 'float32'")]


class Schema(BaseModel):
    model_config = STRICT


class TensorInfo(Schema):
    """One tensor of the delta as the model holds it (a compressed file stores it in parts)."""

    shape: list[Count]
    dtype: DtypeName


class Precision(Schema):
    """How the base was held: its dtype, its quantisation formats (none: not quantised), and the
    fingerprint of its values rounded to bfloat16 (:func:`deltatune.io.fingerprint.rounded_digest`)."""

    dtype: str
    formats: list[str]
    rounded_sha256: Sha256


class BaseRecord(Schema):
    """The base fingerprint (:func:`deltatune.io.base_check.base_fingerprint`)."""

    sha256: Sha256
    modules: Annotated[dict[str, str], Field(min_length=1, description="an object mapping module paths to digests")]
    model_class: str | None = None
    model_type: str | None = None
    precision: Precision | None = None


class Compression(Schema):
    """How ``deltatune.algebra.compress`` stored the tensors listed in ``tensors``."""

    density: Annotated[float, Field(gt=0, le=1, description="a number in (0, 1]")] | None = None
    bits: Literal[8, 2] | None = None
    tensors: list[str]
    bytes_before: Count | None = None
    bytes_after: Count | None = None
    relative_error: float | None = None


class Provenance(Schema):
    """Where the delta came from; free-form, but ``model`` names the base when it is there."""

    model: str | None = None
    created: str | None = None


class DeltaMeta(Schema):
    """``delta.json``."""

    format: Literal["deltatune.delta"]
    schema_version: Count = 0
    deltatune_version: str | None = None
    name: Annotated[str, Field(min_length=1, description="a non-empty string")]
    method: str
    config: dict[str, Any]
    sites: list[str]
    modules_to_save: list[str] = []
    tensors: dict[str, TensorInfo]
    num_parameters: Count | None = None
    tensors_sha256: Sha256
    description_sha256: Sha256 | None = None
    base: BaseRecord
    metrics: dict[str, Any] = {}
    provenance: Provenance = Provenance()
    compression: Compression | None = None
    #: label names of a classification head, in class-index order
    labels: list[str] | None = None
    #: the task the delta was trained for (``"classification"``, ``"causal-lm"``, ...)
    task: str | None = None


def check_meta(meta: Any, meta_file: Path) -> None:
    """Raise :class:`DeltaFileError` unless ``meta`` (parsed ``delta.json``) fits :class:`DeltaMeta`."""
    try:
        DeltaMeta.model_validate(meta)
    except ValidationError as error:
        raise DeltaFileError(validation_message(error, DeltaMeta, meta, str(meta_file), FIX)) from None
    if meta["config"].get("method") != meta["method"]:
        raise DeltaFileError(f"{meta_file}: field 'config.method' is {meta['config'].get('method')!r} but field "
                             f"'method' is {meta['method']!r}; {FIX}")


def _description_sha256(meta: dict[str, Any]) -> str:
    sealed = {key: meta[key] for key in SEALED if key in meta}
    return hashlib.sha256(json.dumps(sealed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its ``description_sha256``, computed over its JSON form (as a reader sees it)."""
    meta = json.loads(json.dumps({key: value for key, value in meta.items() if key != "description_sha256"}))
    return {**meta, "description_sha256": _description_sha256(meta)}


def check_seal(meta: dict[str, Any], meta_file: Path) -> None:
    """Raise :class:`DeltaFileError` if the sealed fields changed after the file was written."""
    recorded = meta.get("description_sha256")
    if recorded is not None and recorded != _description_sha256(meta):
        raise DeltaFileError(
            f"{meta_file}: the fields that decide what loads ({', '.join(SEALED)}) do not match its "
            f"description_sha256: {FIX}. To keep a deliberate edit, remove 'description_sha256'."
        )
