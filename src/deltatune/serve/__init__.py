"""``deltatune serve``: one frozen base, many deltas, over HTTP.

Example:
    >>> from deltatune.serve import Settings, create_app, engine_from_options
    >>> engine = engine_from_options("minilm", "deltas/")
    >>> app = create_app(engine, Settings(admin_token="secret"))   # run with uvicorn
"""

from .app import Settings, create_app
from .engine import Engine, Work, engine_from_options, load_base
from .errors import ApiError
from .library import DeltaLibrary, IndexedDeltas

__all__ = ["ApiError", "DeltaLibrary", "Engine", "IndexedDeltas", "Settings", "Work", "create_app", "engine_from_options", "load_base"]
