"""Every error deltatune raises on bad input derives from :class:`DeltaError`.

Messages name the thing, the value and the fix.
"""


class DeltaError(Exception):
    """Base class of all deltatune errors."""


class ConfigError(DeltaError, ValueError):
    """A delta config has an invalid or unknown field."""


class TargetError(DeltaError, ValueError):
    """Target selection matched nothing, or matched modules the method cannot adapt."""


class NotApplicableError(DeltaError, ValueError):
    """A method cannot be attached to this kind of model at all."""

    #: the ``deltatune`` command's exit status for it (2 is any other bad input)
    exit_code = 3


class DeltaStateError(DeltaError, RuntimeError):
    """An operation does not fit the model's current delta state (unknown name, merged, ...)."""


class MergeError(DeltaError, RuntimeError):
    """A merge would be wrong (non-finite result) or the method cannot merge."""


class DeltaFileError(DeltaError, ValueError):
    """A delta file is missing, corrupt, truncated, or does not match its description."""


class FingerprintError(DeltaFileError):
    """A delta was made for a different base model."""


class LibraryError(DeltaError, ValueError):
    """A delta library (the SQLite index of delta folders) cannot do what was asked: an unknown
    or repeated name, a newer schema, nothing to route to."""


class EditError(DeltaError, RuntimeError):
    """A model edit (ROME / MEMIT) did not reach its target; nothing was attached or written."""


class FederatedError(DeltaError, ValueError):
    """A federated update cannot be used: a delta for another base, NaN or infinite values, a
    payload that does not decode to the global delta's tensors. The server logs the reason and
    the round goes on without that client."""
