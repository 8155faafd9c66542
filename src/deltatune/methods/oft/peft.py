"""OFT in peft's OFT adapter format (peft 0.21.2: ``<module>.oft_R.weight``, the strict upper
triangles of the skew-symmetric blocks, ``(r, n(n-1)/2)`` or ``(1, ...)`` with ``block_share``)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ...core.codec import NO_EQUIVALENT, PeftCodec, Tensors, exact_selector, unsupported_unit
from ...errors import ConfigError, DeltaFileError
from .config import DEFAULT_BLOCK_SIZE, OFTConfig
from .layer import OFTLinear

_KEY = ".oft_R.weight"


class OFTCodec(PeftCodec):
    """OFT on Linear layers (peft's OFT has no GPT-2 ``Conv1D`` layer, so those are refused)."""

    peft_type = "OFT"
    understood = frozenset({"r", "oft_block_size", "module_dropout", "coft", "eps", "block_share",
                            "use_cayley_neumann", "num_cayley_neumann_terms", "init_weights", "fan_in_fan_out",
                            "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"})
    refused: ClassVar[dict[str, str]] = {
        "bias": "it trains the base model's biases, which an OFT delta does not hold (train a BitFit delta for that)",
        "layer_replication": "it builds extra layers by repeating the base's; a delta cannot add layers",
        "target_parameters": "it adapts raw parameters (mixture-of-experts weights); deltatune adapts modules; "
                             + NO_EQUIVALENT,
    }
    exported_fields = frozenset({"r", "block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps",
                                 "block_share", "module_dropout"})
    carried = ("r", "block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps", "block_share",
               "module_dropout")

    def check_site(self, path, module, unit):
        if isinstance(unit, OFTLinear) and unit.transposed:
            raise ConfigError(f"OFT at {path!r} ({type(module).__name__}, weight stored (in, out)): peft's OFT adapts "
                              f"torch Linear, Conv2d and Embedding layers only, not GPT-2 Conv1D, so peft cannot "
                              f"load it")

    def export_delta(self, config, sites, module_names):
        tensors: Tensors = {}
        for path, unit in sites:
            if not isinstance(unit, OFTLinear):
                raise unsupported_unit(unit, path, self.peft_type)
            tensors[f"{path}{_KEY}"] = unit.skew
        fields = {
            # peft wants exactly one of the two; r = 0 means "from the block size" and vice versa
            "r": config.r or 0,
            "oft_block_size": 0 if config.r else (config.block_size or DEFAULT_BLOCK_SIZE),
            "module_dropout": config.module_dropout, "coft": config.coft, "eps": config.eps,
            "block_share": config.block_share, "use_cayley_neumann": config.use_cayley_neumann,
            "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
            "target_modules": exact_selector([p for p, _ in sites], module_names, "."),
            "init_weights": True, "fan_in_fan_out": False, "bias": "none", "exclude_modules": None,
            "layers_to_transform": None, "layers_pattern": None,
        }
        return fields, tensors

    def import_delta(self, peft_config, tensors):
        sites: dict[str, Tensors] = {}
        rest: Tensors = {}
        sizes = set()
        for key, value in tensors.items():
            if not key.endswith(_KEY):
                rest[key] = value
                continue
            if value.dim() != 2:
                raise DeltaFileError(f"peft OFT tensor {key!r} has shape {list(value.shape)}; (blocks, n(n-1)/2) expected")
            sizes.add(_block_size(key, value.shape[1]))
            sites[key.removesuffix(_KEY)] = {"skew": value}
        r = int(peft_config.get("r") or 0)
        fields: dict[str, Any] = {
            "use_cayley_neumann": bool(peft_config.get("use_cayley_neumann", True)),
            "num_cayley_neumann_terms": int(peft_config.get("num_cayley_neumann_terms", 5)),
            "coft": bool(peft_config.get("coft", False)), "eps": float(peft_config.get("eps", 6e-5)),
            "block_share": bool(peft_config.get("block_share", False)),
            "module_dropout": float(peft_config.get("module_dropout", 0.0)),
        }
        if r:
            fields["r"] = r
        else:
            # peft silently changes a block size that does not divide a module's width; the tensors tell
            configured = int(peft_config.get("oft_block_size") or DEFAULT_BLOCK_SIZE)
            if sizes and sizes != {configured}:
                raise ConfigError(f"cannot import the peft OFT adapter: its tensors hold blocks of size {sorted(sizes)} "
                                  f"where the config says oft_block_size={configured} (peft adjusted a size that did "
                                  f"not divide a module's width); deltatune refuses such sizes: retrain with one "
                                  f"that divides every target's input width")
            fields["block_size"] = configured
        return OFTConfig(**fields), sites, rest


def _block_size(key: str, entries: int) -> int:
    """The block size ``n`` with ``n(n-1)/2 = entries``."""
    n = (1 + math.isqrt(1 + 8 * entries)) // 2
    if n * (n - 1) // 2 != entries:
        raise DeltaFileError(f"peft OFT tensor {key!r} has {entries} entries per block, not n(n-1)/2 for any n")
    return n
