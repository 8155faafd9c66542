"""The deltas folder a server offers: safe name lookup, listing, and each delta's description."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

from ..errors import DeltaFileError
from ..io.artifact import META_FILE, TENSORS_FILE, read_meta
from ..io.meaning import run_folder_meaning
from ..library import CORRUPT, MISSING, Library
from .errors import ApiError

#: a delta name (the request schemas state the same rule)
NAME_RULE = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
NAME_PATTERN = re.compile(NAME_RULE)
#: the name that means "no delta" in requests
BASE = "base"
#: the name that means "the delta the library's router chooses" (``--library`` servers)
AUTO = "auto"


class DeltaLibrary:
    """The delta folders under one directory, each ``<directory>/<name>/delta.json``
    (``--deltas``); :class:`IndexedDeltas` is the same lookup over a library index (``--library``).

    Args:
        directory: the deltas folder (``--deltas``).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise DeltaFileError(f"deltas folder {directory} does not exist; create it or pass another --deltas")
        self._meta: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """The folder of delta ``name``.

        Raises:
            ApiError: 400 for a name that is not ``[A-Za-z][A-Za-z0-9_-]*`` or resolves outside
                the deltas folder; 404 when no such delta exists.
        """
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (BASE, AUTO):
            raise ApiError(400, "invalid_delta_name",
                           f"delta name {name!r} is not allowed; names start with a letter and hold only letters, "
                           f"digits, '_' and '-' (at most 64), {BASE!r} means the base model and {AUTO!r} the delta "
                           f"the library's router chooses")
        return self.locate(name)

    def locate(self, name: str) -> Path:
        """The folder of a well-formed delta name (404 when there is none)."""
        folder = (self.directory / name).resolve()
        if not folder.is_relative_to(self.directory):
            raise ApiError(400, "invalid_delta_name", f"delta {name!r} points outside the deltas folder; refused")
        if not (folder / META_FILE).is_file():
            raise self.unknown(name, "in the deltas folder")
        return folder

    def unknown(self, name: str, where: str) -> ApiError:
        known = self.available()
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        return ApiError(404, "unknown_delta", f"no delta {name!r} {where}; available: [{shown}]")

    def available(self) -> list[str]:
        """Names of the delta folders present now, sorted."""
        names = []
        for entry in self.directory.iterdir():
            named = NAME_PATTERN.fullmatch(entry.name) and entry.name not in (BASE, AUTO)
            if named and (entry / META_FILE).is_file() and entry.resolve().is_relative_to(self.directory):
                names.append(entry.name)
        return sorted(names)

    def meta(self, name: str) -> dict[str, Any]:
        """The delta's ``delta.json``, re-read when the file changes."""
        path = self.folder(name) / META_FILE
        stamp = path.stat().st_mtime_ns
        with self._lock:
            cached = self._meta.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        meta = read_meta(path.parent)
        with self._lock:
            self._meta[name] = (stamp, meta)
        return meta

    def labels(self, name: str) -> list[str] | None:
        """Label names of a classification delta: ``labels`` in its ``delta.json``, else (older
        deltas) its run folder's ``metrics.json``, else ``labels`` in ``delta.json``'s metrics or
        provenance; ``None`` if unknown."""
        meta = self.meta(name)
        if meta.get("labels"):
            return [str(label) for label in meta["labels"]]
        run = run_folder_meaning(self.folder(name))
        if run is not None and run.labels:
            return list(run.labels)
        for section in ("metrics", "provenance"):
            labels = (meta.get(section) or {}).get("labels")
            if labels:
                return [str(label) for label in labels]
        return None

    def describe(self, name: str) -> dict[str, Any]:
        """What ``GET /v1/deltas`` shows of one delta: method, size, fingerprint, task, labels, metrics."""
        try:
            meta = self.meta(name)
        except DeltaFileError as error:
            return {"name": name, "error": str(error)}
        tensors = self.folder(name) / TENSORS_FILE
        return {
            "name": name,
            "method": meta.get("method"),
            "size_bytes": tensors.stat().st_size if tensors.is_file() else None,
            "num_parameters": meta.get("num_parameters"),
            "fingerprint": meta["base"].get("sha256"),
            "base_class": meta["base"].get("model_class"),
            "task": meta.get("task"),
            "labels": self.labels(name),
            "metrics": meta.get("metrics") or {},
            "provenance": meta.get("provenance") or {},
        }


class IndexedDeltas(DeltaLibrary):
    """The deltas of a library index (``deltatune library``, ``--library DB``): the same lookup
    as a deltas folder, each name resolved to the folder the index records. A folder that is
    missing or corrupt now is not offered (``GET /v1/deltas`` leaves it out; a request for it is a 404 saying so).

    Args:
        db: the library's SQLite file.
    """

    def __init__(self, db: str | Path) -> None:
        if not Path(db).expanduser().is_file():
            raise DeltaFileError(f"library {db} does not exist; create it with deltatune library add, or pass another "
                                 f"--library")
        self.index = Library(db)
        self.directory = self.index.db.parent
        self._meta = {}
        self._lock = threading.Lock()

    def locate(self, name: str) -> Path:
        if name not in self.index:
            raise self.unknown(name, f"in library {self.index.db}")
        record = self.index.get(name)
        if record.status in (MISSING, CORRUPT):
            raise ApiError(404, "unknown_delta", f"delta {name!r} of library {self.index.db} is {record.status}: "
                                                 f"{record.problem}; check it with deltatune library verify")
        return Path(record.path)

    def available(self) -> list[str]:
        return [r.name for r in self.index.list() if r.status not in (MISSING, CORRUPT) and r.name not in (BASE, AUTO)]
