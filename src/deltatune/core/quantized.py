"""Quantised base weights: one way to read them as floats and one way to write them back.

A quantised frozen base keeps its ``nn.Linear`` modules; only ``weight`` becomes a torchao
tensor subclass (int8 with one scale per output row, or NF4 in blocks of 64). The rest of
deltatune never looks inside it: everything that reads a base tensor calls :func:`dense`
(a float32 dequantised copy, or the tensor itself when it is not quantised) and everything
that writes one calls :func:`requantize` (the same format, from float values).

A module quantised here also remembers a 64-value sample of each float tensor it replaced
(:func:`source_sample`), so a fingerprint can tell "this base, quantised" from "another base".
It is kept on the module, not the tensor: ``module.to(...)`` may rebuild the parameter.

torchao is imported only when a model is quantised: a tensor cannot be a torchao tensor before
torchao is imported, so :func:`format_of` answers ``None`` for every tensor until then.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

#: values a fingerprint samples from each tensor, at evenly spaced positions
SAMPLES = 64
#: NF4 quantises blocks of this many consecutive values, one scale each (QLoRA's choice)
NF4_BLOCK = 64


def sample_positions(numel: int) -> torch.Tensor | None:
    """``SAMPLES`` evenly spaced flat positions in integer arithmetic (the same on every device
    and for any size), or ``None`` when the tensor is small enough to take whole."""
    if numel <= SAMPLES:
        return None
    return torch.arange(SAMPLES, dtype=torch.int64) * (numel - 1) // (SAMPLES - 1)


def sample(tensor: torch.Tensor) -> torch.Tensor:
    """The values a fingerprint reads from a plain tensor, as float64 on the CPU."""
    flat = tensor.detach().reshape(-1)
    index = sample_positions(flat.numel())
    if index is not None:
        flat = flat[index.to(flat.device)]
    return flat.to(torch.float64).cpu()


@dataclass(frozen=True)
class SourceSample:
    """What a quantised weight remembers of the float tensor it was made from."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    values: torch.Tensor  # :func:`sample` of the float tensor


@dataclass(frozen=True)
class QuantFormat:
    """One weight format: how to make it from floats and read it back."""

    name: str  # the value of ``--quantize``
    description: str
    #: relative Frobenius error of real weights after a round trip, over every block Linear of
    #: MiniLM and SmolLM2 (measured: int8 0.0099 and 0.0085, NF4 0.094 and 0.094)
    typical_error: float
    tensor_type: Callable[[], type]
    make: Callable[[torch.Tensor], torch.Tensor]
    read: Callable[[torch.Tensor], torch.Tensor]
    #: why this format cannot hold a weight of this shape, or ``None``
    refuses: Callable[[torch.Size], str | None]


class _ImportNoise(logging.Filter):
    """Drops the log lines importing torchao on a CPU build always prints: the CUDA kernels it
    cannot load, and torch's notice about enum registrations. transformers imports torchao
    whenever it is installed, so without this every model load would print them."""

    NOISE = ("Failed to load", "is an Enum subclass and is now natively supported")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(part in message for part in self.NOISE)


for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_ImportNoise())


def torchao_quantization():
    """``torchao.quantization``, imported on first use."""
    try:
        import torchao.quantization
    except ImportError as error:
        raise ConfigError(f"quantising a base needs torchao ({error}); install it with "
                          f"pip install 'deltatune[quantize]'") from None
    return torchao.quantization


def _int8(weight: torch.Tensor) -> torch.Tensor:
    ao = torchao_quantization()
    return ao.Int8Tensor.from_hp(weight, granularity=ao.PerRow())


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    # the block scales are themselves quantised in groups; the group must divide their count
    scalers = weight.numel() // NF4_BLOCK
    group = next(g for g in (256, 128, 64, 32, 16, 8, 4, 2, 1) if scalers % g == 0)
    return torchao_quantization().to_nf4(weight, block_size=NF4_BLOCK, scaler_block_size=group)


def _nf4_refuses(shape: torch.Size) -> str | None:
    numel = shape.numel()
    if numel % NF4_BLOCK:
        return f"4-bit (NF4) quantises blocks of {NF4_BLOCK} values and this weight has {numel}"
    return None


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat(
        name="int8",
        description="int8 weight-only, one scale per output row (torchao Int8Tensor)",
        typical_error=0.009,
        tensor_type=lambda: torchao_quantization().Int8Tensor,
        make=_int8,
        read=lambda t: t.dequantize().to(torch.float32),
        refuses=lambda shape: None,
    ),
    "4bit": QuantFormat(
        name="4bit",
        description=f"NF4 in blocks of {NF4_BLOCK} with double-quantised scales, as QLoRA (torchao NF4Tensor)",
        typical_error=0.094,
        tensor_type=lambda: torchao_quantization().NF4Tensor,
        make=_nf4,
        read=lambda t: t.get_original_weight().to(torch.float32),
        refuses=_nf4_refuses,
    ),
}


def get_format(name: str) -> QuantFormat:
    """The format called ``name``, or a :class:`ConfigError` listing the choices."""
    if name not in FORMATS:
        raise ConfigError(f"unknown quantisation {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(tensor: torch.Tensor) -> QuantFormat | None:
    """The format of a quantised tensor, or ``None`` for a plain one."""
    if "torchao" not in sys.modules or type(tensor) in (torch.Tensor, nn.Parameter):
        return None
    return next((f for f in FORMATS.values() if isinstance(tensor, f.tensor_type())), None)


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as floats: dequantised (float32, a new tensor) if it is quantised, else itself."""
    fmt = format_of(tensor)
    return tensor if fmt is None else fmt.read(tensor.detach())


def quantize_parameter(module: nn.Module, name: str, fmt: QuantFormat) -> None:
    """Replace ``module``'s float parameter ``name`` by a frozen one in ``fmt``, and remember a
    sample of the float tensor for fingerprints."""
    weight = getattr(module, name).detach()
    module.__dict__.setdefault("_deltatune_sources", {})[name] = SourceSample(tuple(weight.shape), weight.dtype,
                                                                              sample(weight))
    setattr(module, name, nn.Parameter(fmt.make(weight), requires_grad=False))


def requantize(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    """``value`` (float) as a frozen parameter in the format and precision of the quantised ``like``."""
    fmt = format_of(like)
    if fmt is None:
        raise TypeError("requantize() needs a quantised tensor to copy the format of")
    return nn.Parameter(fmt.make(value.detach().to(like.dtype)), requires_grad=False)


def packed(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a quantised tensor is stored in (codes, scales, ...), in a fixed order."""
    names, _ = tensor.__tensor_flatten__()
    return [getattr(tensor, n) for n in names]


def source_sample(module: nn.Module, name: str) -> SourceSample | None:
    """What ``module`` remembers of the float tensor its parameter ``name`` was quantised from."""
    return module.__dict__.get("_deltatune_sources", {}).get(name)


def replace_parameter(root: nn.Module, key: str, value: nn.Parameter) -> None:
    """Put ``value`` in place of ``root``'s parameter ``key`` (a dotted name below ``root``)."""
    owner, _, leaf = key.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, leaf, value)


def write(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Store float ``value`` in ``root``'s parameter ``key``: copied into a plain parameter,
    quantised again (a new parameter of the same format) into a quantised one."""
    param = root.get_parameter(key)
    if format_of(param) is None:
        with torch.no_grad():
            param.copy_(value)
    else:
        replace_parameter(root, key, requantize(value, param))


class _QuantizedLinearFunction(torch.autograd.Function):
    """``x W^T + b`` with a frozen quantised ``W``: the backward dequantises ``W`` again instead
    of keeping a float copy from the forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # frozen and immutable (a merge replaces it): no version check needed
        ctx.bias_shape = None if bias is None else bias.shape
        return F.linear(x, dense(weight).to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad @ dense(ctx.weight).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is quantised (:func:`deltatune.models.quantize.quantize_model`
    gives a quantised module this class; :func:`deltatune.fold` gives back ``nn.Linear``).

    Through torchao's own ``F.linear`` autograd kept a float32 copy of every dequantised weight
    until the backward pass: on SmolLM2 about 425 MB more than a float32 base holds, so an int8
    base trained in more memory than float32. Here only the quantised weight is kept."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if format_of(self.weight) is None:  # a float weight put back (fold): the plain forward
            return super().forward(input)
        return _QuantizedLinearFunction.apply(input, self.weight, self.bias)


def to_float(module: nn.Module) -> None:
    """Replace ``module``'s own quantised parameters by their float32 values and forget their
    sources; a :class:`QuantizedLinear` becomes a plain ``nn.Linear`` again."""
    for key, param in list(module.named_parameters(recurse=False)):
        if format_of(param) is not None:
            replace_parameter(module, key, nn.Parameter(dense(param), requires_grad=False))
    module.__dict__.pop("_deltatune_sources", None)
    if isinstance(module, QuantizedLinear):
        module.__class__ = nn.Linear
