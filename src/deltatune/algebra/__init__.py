"""Delta algebra: task vectors, merging N deltas, low-rank compression.

Example:
    >>> from deltatune.algebra import TaskVector, merge_deltas
    >>> a = TaskVector.from_folder(model, "runs/sentiment")
    >>> (a - 0.5 * TaskVector.from_folder(model, "runs/spam")).to_delta(model, "edited")
    >>> report = merge_deltas(model, ["runs/sentiment", "runs/spam"], method="ties", density=0.5)
"""


from .eigenbasis import eigen_basis, principal_directions, save_basis
from .lowrank import LowRank, low_rank
from .merging import METHODS, LayerMerge, MergeReport, merge_deltas, merge_task_vectors
from .task_vector import LowRankEntry, TaskVector, attach_task_vector, interpolate, task_vector_of

__all__ = [
    "METHODS",
    "LayerMerge",
    "LowRank",
    "LowRankEntry",
    "MergeReport",
    "TaskVector",
    "attach_task_vector",
    "eigen_basis",
    "interpolate",
    "low_rank",
    "merge_deltas",
    "merge_task_vectors",
    "principal_directions",
    "save_basis",
    "task_vector_of",
]
