"""Model editing as a delta: ROME (one fact, one layer) and MEMIT (a batch over several layers).

The edit is computed in closed form from key statistics and a searched value, and attached as
a LoRA whose ``B @ A`` is the update; see docs/EDITING.md.
"""

from .api import EDITORS, EditReport, attach_updates, edit
from .evaluate import EditScores, FactScores, next_token_log_probs, score_facts
from .facts import Fact, fact_from_dict, load_facts, packaged_facts
from .memit import memit, memit_factors
from .rome import LayerUpdate, rome, rome_factors
from .sites import Site, edit_sites
from .stats import DEFAULT_CORPUS, KeyStatistics
from .value import EditSettings, Value, optimise_value

__all__ = [
    "DEFAULT_CORPUS", "EDITORS", "EditReport", "EditScores", "EditSettings", "Fact", "FactScores", "KeyStatistics",
    "LayerUpdate", "Site", "Value", "attach_updates", "edit", "edit_sites", "fact_from_dict", "load_facts", "memit",
    "memit_factors", "next_token_log_probs", "optimise_value", "packaged_facts", "rome", "rome_factors", "score_facts",
]
