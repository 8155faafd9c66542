"""A library of deltas: a SQLite index of delta folders, and routing inputs over it.

- :class:`Library` (``index.py``): add / list / search / show / remove / verify delta folders;
  the folders stay the source of truth, the database is an index (``record.py``: what is
  recorded, a folder's health; ``query.py``: search filters).
- :func:`route_auto` (``auto.py``): for inputs that name no delta, choose among the library's
  deltas for the model's base: a centroid router (``centroid.py``: each delta's training
  examples' mean embedding, nearest by cosine, per row) or Arrow (``arrow.py``: per token and
  layer, by each LoRA's top right singular vector).
- ``heads.py``: each row answered by its routed delta's own head, whatever its width;
  ``evaluate.py``: ``deltatune eval --delta auto`` over a dataset's test split.
"""

from .arrow import ArrowRouting, arrow, check_arrow, prototype
from .auto import ROUTERS, AutoRoute, deltas_for_base, load_deltas, route_auto
from .centroid import embed, embed_texts, nearest
from .index import DEFAULT_DB, LIBRARY_ENV, SCHEMA_VERSION, Library, default_db
from .query import Query, Threshold
from .record import CHANGED, CORRUPT, MISSING, OK, DeltaRecord, read_record

__all__ = ["ArrowRouting", "AutoRoute", "ROUTERS", "arrow", "check_arrow", "deltas_for_base", "embed",
           "embed_texts", "load_deltas", "nearest", "prototype", "route_auto", "CHANGED", "CORRUPT", "DEFAULT_DB", "DeltaRecord", "LIBRARY_ENV", "Library", "MISSING", "OK", "Query",
           "SCHEMA_VERSION", "Threshold", "default_db", "read_record"]
