"""What the library records of one delta folder, read from its files, and the folder's health.

The folder stays the source of truth: a record is what ``delta.json`` (through
:func:`deltatune.io.artifact.read_meta`), the run's ``metrics.json`` and the files' checksums
said when the delta was added. :func:`folder_status` compares the folder now with that record.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DeltaFileError
from ..io.artifact import META_FILE, TENSORS_FILE, file_sha256, read_meta
from ..io.meaning import RUN_METRICS, run_folder_meaning

#: the files whose checksums the library keeps
CHECKED_FILES = (META_FILE, TENSORS_FILE)

OK, CHANGED, MISSING, CORRUPT = "ok", "changed", "missing", "corrupt"


@dataclass
class FileStamp:
    """One file's checksum, with its size and modification time (a cheap first look)."""

    sha256: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        stat = path.stat()
        return cls(file_sha256(path), stat.st_size, stat.st_mtime_ns)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass
class DeltaRecord:
    """One library entry: a delta folder's description, the user's tags and note."""

    name: str
    path: str
    method: str
    task: str | None
    labels: list[str] | None
    fingerprint: str
    model_class: str | None
    model_type: str | None
    num_parameters: int | None
    metrics: dict[str, float]
    files: dict[str, FileStamp]
    tags: list[str] = field(default_factory=list)
    note: str = ""
    added: str = ""
    #: the folder's state (``ok``, ``changed``, ``missing``, ``corrupt``) when last looked at
    status: str = OK
    problem: str = ""
    #: the dimension of the stored centroid of its training examples (0: none)
    centroid_dims: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (what ``library show`` prints)."""
        out = {key: value for key, value in self.__dict__.items() if key != "files"}
        out["files"] = {name: stamp.to_dict() for name, stamp in self.files.items()}
        return out


def flat_metrics(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested metrics as dotted keys (``test.accuracy``); booleans and lists left out."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flat_metrics(value, f"{prefix}{key}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data):
        out[prefix[:-1]] = float(data)
    return out


def read_record(folder: str | Path, name: str | None = None) -> DeltaRecord:
    """The record of the delta in ``folder`` (named ``name``, default its saved name).

    Raises:
        DeltaFileError: the folder holds no readable delta (the message says which file and why).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise DeltaFileError(f"delta folder {folder} does not exist; pass the folder a training run or "
                             f"deltatune.save wrote")
    meta = read_meta(folder)
    tensors = folder / TENSORS_FILE
    if not tensors.is_file():
        raise DeltaFileError(f"{tensors} not found next to {META_FILE}; save the delta again")
    files = {file: FileStamp.of(folder / file) for file in CHECKED_FILES}
    if files[TENSORS_FILE].sha256 != meta["tensors_sha256"]:
        raise DeltaFileError(f"{tensors} does not match the checksum in {META_FILE}: it is truncated, corrupt or from "
                             f"another save; save the delta again")
    metrics = flat_metrics(meta.get("metrics") or {})
    run_metrics = folder / RUN_METRICS
    if run_metrics.is_file():
        try:
            metrics.update(flat_metrics(json.loads(run_metrics.read_text(encoding="utf-8"))))
        except (ValueError, UnicodeDecodeError):
            pass  # a run file we cannot read only means fewer searchable metrics
    labels, task = meta.get("labels"), meta.get("task")
    if not labels or not task:
        run = run_folder_meaning(folder)
        labels = labels or (list(run.labels) if run is not None and run.labels else None)
        task = task or (run.task if run is not None else None)
    for section in ("metrics", "provenance"):  # where older deltas kept their label names
        recorded = (meta.get(section) or {}).get("labels")
        if not labels and isinstance(recorded, list) and recorded:
            labels = recorded
    base = meta["base"]
    return DeltaRecord(
        name=name or meta["name"], path=str(folder), method=meta["method"], task=task,
        labels=[str(label) for label in labels] if labels else None, fingerprint=base.get("sha256", ""),
        model_class=base.get("model_class"), model_type=base.get("model_type"),
        num_parameters=meta.get("num_parameters"), metrics=metrics, files=files)


def folder_status(record: DeltaRecord, deep: bool = False) -> tuple[str, str]:
    """``(status, problem)`` of a recorded folder now.

    ``missing``: the folder or one of its files is gone; ``corrupt``: ``delta.json`` does not read
    or the tensors do not match its checksum; ``changed``: a sound delta, but other files than
    the ones added (saved again: ``library add --replace`` records it anew); ``ok`` otherwise.
    Without ``deep``, a file whose size and modification time are as recorded is not re-hashed.
    """
    folder = Path(record.path)
    if not folder.is_dir():
        return MISSING, f"folder {folder} does not exist"
    gone = [file for file in CHECKED_FILES if not (folder / file).is_file()]
    if gone:
        return MISSING, f"{folder / gone[0]} does not exist"
    changed = []
    for file, stamp in record.files.items():
        stat = (folder / file).stat()
        if not deep and stat.st_size == stamp.size and stat.st_mtime_ns == stamp.mtime_ns:
            continue
        if file_sha256(folder / file) != stamp.sha256:
            changed.append(file)
    if not changed:
        return OK, ""
    try:
        meta = read_meta(folder)
    except DeltaFileError as error:
        return CORRUPT, str(error)
    if file_sha256(folder / TENSORS_FILE) != meta["tensors_sha256"]:
        return CORRUPT, f"{folder / TENSORS_FILE} does not match the checksum in {META_FILE}"
    return CHANGED, f"{', '.join(changed)} changed since the delta was added; add it again with --replace"
