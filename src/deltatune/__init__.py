"""deltatune: attach, train, save, merge and combine small deltas on a frozen base model.

Example:
    >>> import deltatune as dt
    >>> report = dt.attach(model, dt.LoRAConfig(r=8), name="sentiment")
    >>> print(report)                       # what was adapted, trainable parameters
    >>> ...                                 # train: only the delta's parameters require grad
    >>> dt.save(model, "out/sentiment")     # delta.safetensors + delta.json
    >>> dt.load(fresh_base, "out/sentiment")
"""

from . import methods  # noqa: F401  (registers the built-in methods first, in listing order)
from .algebra import TaskVector, eigen_basis, merge_deltas, save_basis
from .compose import (
    Average,
    BatchSplit,
    Block,
    Fuse,
    Parallel,
    Stack,
    block_from_dict,
    compose,
    get_composition,
    set_composition,
)
from .core.config import DeltaConfig
from .core.inject import (
    activate,
    after_step,
    loss_terms,
    active_deltas,
    attach,
    base_only,
    deactivate,
    delete,
    get_config,
    list_deltas,
    set_active,
    using,
)
from .core.merge import fold, merge, requantization_errors, unmerge
from .editing import EditReport, EditSettings, Fact, KeyStatistics, edit
from .core.mixing import get_routing, route
from .core.recompute import disable_gradient_checkpointing, enable_gradient_checkpointing, recompute_context
from .core.rows import Routing
from .core.params import base_parameters, count_parameters, delta_parameters, set_trainable
from .core.registry import (
    MethodSpec,
    Mixing,
    config_from_dict,
    get_method,
    load_plugins,
    method_names,
    method_specs,
    register_method,
)
from .core.report import AttachReport
from .core.unit import DeltaUnit, Placement
from .errors import (
    ConfigError,
    DeltaError,
    DeltaFileError,
    DeltaStateError,
    EditError,
    FingerprintError,
    LibraryError,
    MergeError,
    NotApplicableError,
    TargetError,
)
from .io.artifact import load, read_meta, save
from .library import Library, route_auto
from .models.quantize import QuantizeReport, quantize_model
from .swap import CacheStats, DeltaCache, SwapResult, replace
from .version import __version__
from .methods.abba import ABBAConfig
from .methods.adalora import AdaLoRAConfig
from .methods.adapter import AdapterConfig
from .methods.adapterbias import AdapterBiasConfig
from .methods.aligner import AlignerConfig
from .methods.bitfit import BitFitConfig
from .methods.compacter import CompacterConfig
from .methods.dense import DenseConfig
from .methods.diablo import DiaBloConfig
from .methods.dylora import DyLoRAConfig
from .methods.edora import EDoRAConfig
from .methods.eigenlora import EigenLoRAConfig
from .methods.ether import ETHERConfig
from .methods.fusion import FusionConfig
from .methods.head import HeadConfig
from .methods.hydra import HydraConfig
from .methods.hyperadapter import HyperAdapterConfig
from .methods.ia3 import IA3Config
from .methods.llamaadapter import LlamaAdapterConfig
from .methods.loha import LoHaConfig
from .methods.lokr import LoKrConfig
from .methods.lora import DoRAConfig, LoRAConfig
from .methods.loraxs import LoRAXSConfig
from .methods.molora import MoLoRAConfig
from .methods.msplora import MSPLoRAConfig
from .methods.neuroada import NeuroAdaConfig
from .methods.oft import OFTConfig
from .methods.paca import PaCAConfig
from .methods.prefix import PrefixConfig
from .methods.prompt import PromptConfig
from .methods.reft import ReftConfig
from .methods.road import RoadConfig
from .methods.sparseadapter import SparseAdapterConfig
from .methods.tiedlora import TiedLoRAConfig
from .methods.vblora import VBLoRAConfig
from .methods.vera import VeRAConfig

__all__ = [
    "ABBAConfig", "AdaLoRAConfig", "AdapterBiasConfig", "AdapterConfig", "AlignerConfig", "AttachReport", "Average",
    "BatchSplit", "BitFitConfig", "Block", "CacheStats", "CompacterConfig", "ConfigError", "DeltaCache",
    "DeltaConfig", "DeltaError", "DeltaFileError", "DeltaStateError", "DeltaUnit", "DenseConfig", "DiaBloConfig",
    "DoRAConfig", "DyLoRAConfig", "EDoRAConfig", "ETHERConfig", "EditError", "EditReport", "EditSettings",
    "EigenLoRAConfig", "Fact", "FingerprintError", "Fuse", "FusionConfig", "HeadConfig", "HydraConfig",
    "HyperAdapterConfig", "IA3Config", "KeyStatistics", "Library", "LibraryError", "LlamaAdapterConfig", "LoHaConfig",
    "LoKrConfig", "LoRAConfig", "LoRAXSConfig", "MSPLoRAConfig", "MergeError", "MethodSpec", "Mixing", "MoLoRAConfig",
    "NeuroAdaConfig", "NotApplicableError", "OFTConfig", "PaCAConfig", "Parallel", "Placement", "PrefixConfig",
    "PromptConfig", "QuantizeReport", "ReftConfig", "RoadConfig", "Routing", "SparseAdapterConfig", "Stack",
    "SwapResult", "TargetError", "TaskVector", "TiedLoRAConfig", "VBLoRAConfig", "VeRAConfig", "activate",
    "active_deltas", "after_step", "attach", "base_only", "base_parameters", "block_from_dict", "compose",
    "config_from_dict", "count_parameters", "deactivate", "delete", "delta_parameters",
    "disable_gradient_checkpointing", "edit", "eigen_basis", "enable_gradient_checkpointing", "fold",
    "get_composition", "get_config", "get_method", "get_routing", "list_deltas", "load", "load_plugins", "loss_terms",
    "merge", "merge_deltas", "method_names", "method_specs", "quantize_model", "read_meta", "recompute_context",
    "register_method", "replace", "requantization_errors", "route", "route_auto", "save", "save_basis", "set_active",
    "set_composition", "set_trainable", "unmerge", "using",
]

load_plugins()  # third-party methods: deltatune.methods entry points and $DELTATUNE_PLUGINS

