"""What travels between the Flower server and its clients: a delta's trainable tensors.

Down (server to clients) the global delta goes as it is. Up (client to server) each client's
delta goes as it is, or, with a :class:`Codec`, as its *difference* from the global delta
compressed by the same top-k / int8 / ternary schemes ``deltatune compress`` uses
(:mod:`deltatune.io.compressed`): matrices are compressed, vectors (biases, scales) go as they
are. The server rebuilds each client's delta from the global one it sent, and
:func:`decode_update` refuses anything that does not decode to exactly the global delta's
tensors (names, shapes, finite float32 values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algebra.compress import check_scheme, compress_tensor, describe_scheme
from ..core.params import delta_parameters
from ..errors import ConfigError, DeltaFileError, FederatedError
from ..io.compressed import decode, encode


@dataclass(frozen=True)
class Codec:
    """How client updates are compressed on the wire: keep the top ``density`` of each matrix's
    difference from the global delta, and/or quantise it to ``bits`` (8: int8, 2: ternary)."""

    density: float | None = None
    bits: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> Codec:
        """``none``, ``int8``, ``ternary``, ``topk:0.1`` or a ``+`` of a top-k and a quantisation
        (``topk:0.1+int8``)."""
        density, bits = None, None
        for part in (text or "none").lower().split("+"):
            if part == "none":
                continue
            if part in ("int8", "ternary"):
                bits = 8 if part == "int8" else 2
            elif part.startswith("topk:"):
                try:
                    density = float(part[5:])
                except ValueError:
                    raise ConfigError(f"codec {text!r}: {part[5:]!r} is not a fraction; e.g. topk:0.1") from None
            else:
                raise ConfigError(f"unknown codec part {part!r} in {text!r}; use none, int8, ternary, topk:<fraction> "
                                  f"or a combination such as topk:0.1+int8")
        if density is not None or bits is not None:
            check_scheme(density, bits)
        return cls(density, bits)

    @property
    def active(self) -> bool:
        return self.density is not None or self.bits is not None

    def __str__(self) -> str:
        return describe_scheme(self.density, self.bits) if self.active else "none"


def delta_values(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Delta ``name``'s trainable tensors by portable name (copies, float32 on the CPU)."""
    return {key: param.detach().to("cpu", torch.float32).clone() for key, param in delta_parameters(model, name)
            if param.requires_grad}


def load_values(model: nn.Module, name: str, values: dict[str, torch.Tensor]) -> None:
    """Write ``values`` (as :func:`delta_values` gives them) into delta ``name``'s parameters.

    Raises:
        FederatedError: a tensor is missing, extra or of another shape.
    """
    params = {key: param for key, param in delta_parameters(model, name) if param.requires_grad}
    check_structure(values, {key: tuple(p.shape) for key, p in params.items()})
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(values[key].to(param.dtype))


def check_structure(values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """``values`` holds exactly the tensors of ``shapes``, each of that shape, finite.

    Raises:
        FederatedError: naming the first difference.
    """
    missing, extra = sorted(set(shapes) - set(values)), sorted(set(values) - set(shapes))
    if missing or extra:
        raise FederatedError(f"the update does not match the global delta: missing {missing[:3]}, unexpected "
                             f"{extra[:3]}; the client trains another delta configuration")
    for key, shape in shapes.items():
        value = values[key]
        if tuple(value.shape) != shape:
            raise FederatedError(f"tensor {key!r} has shape {tuple(value.shape)}, the global delta's has {shape}")
        if not value.is_floating_point():
            raise FederatedError(f"tensor {key!r} has dtype {value.dtype}; a delta's tensors are floats")
        if not bool(torch.isfinite(value).all()):
            raise FederatedError(f"tensor {key!r} holds NaN or infinite values; the client's training diverged")


def _compressed_keys(reference: dict[str, torch.Tensor]) -> list[str]:
    return [key for key, value in reference.items() if value.dim() >= 2]


def encode_update(values: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """The tensors a client sends: ``values`` themselves, or their compressed differences from
    ``reference`` (the global delta the client started from)."""
    if not codec.active:
        return {key: value.contiguous() for key, value in values.items()}
    parts = {}
    for key, value in values.items():
        difference = value - reference[key]
        if value.dim() >= 2:
            parts.update(encode(key, compress_tensor(difference, codec.density, codec.bits)))
        else:
            parts[key] = difference.contiguous()
    return parts


def decode_update(parts: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], codec: Codec) -> dict[str, torch.Tensor]:
    """A client's delta rebuilt from what it sent (the inverse of :func:`encode_update`).

    Raises:
        FederatedError: the parts do not decode to the global delta's tensors, or hold NaN / inf.
    """
    if codec.active:
        meta = {"tensors": {key: {"shape": list(value.shape), "dtype": "float32"} for key, value in reference.items()},
                "compression": {"density": codec.density, "bits": codec.bits, "tensors": _compressed_keys(reference)}}
        try:
            differences = decode(parts, meta)
        except DeltaFileError as error:
            raise FederatedError(f"the compressed update is corrupt: {error}") from None
        check_structure(differences, {key: tuple(v.shape) for key, v in reference.items()})
        values = {key: reference[key] + differences[key].to(torch.float32) for key in reference}
    else:
        values = dict(parts)
    check_structure(values, {key: tuple(v.shape) for key, v in reference.items()})
    return {key: value.to(torch.float32) for key, value in values.items()}


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors' data (what a message carries, before framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())

