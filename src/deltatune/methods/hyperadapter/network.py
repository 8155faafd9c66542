"""The shared hypernetwork, the per-task root unit and the per-module adapter unit of
hyper-adapters (see the package docstring for the formula)."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...core.rows import as_rows, gathered, per_delta_post
from ...core.unit import DeltaUnit

if TYPE_CHECKING:
    from . import HyperAdapterConfig

#: the adapter's non-linearities; each is 0 at 0, so bottlenecks padded with zeros stay exact
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}
NORM_EPS = 1e-5


class HyperNetwork(nn.Module):
    """Generates one bottleneck adapter ``(D, b_D, U, b_U[, gamma, beta])`` from a task embedding,
    a layer and an adapter position: ``z = LayerNorm(W2 relu(W1 [t; l; p] + c1) + c2)``, then one
    linear generator per tensor, ``G z / task_dim + g``.

    The ``1 / task_dim`` keeps a generated weight's optimizer step at the size of a plain
    adapter's: Adam moves every entry of ``G`` by about the learning rate, and a generated entry
    sums ``task_dim`` of them, so without it each step moved the adapters ~``task_dim`` times
    further (measured: flat losses at adapters' usual 1e-3).

    Attributes:
        layout: adapted module path -> (layer, position): the sites it generates adapters for.
    """

    def __init__(self, config: HyperAdapterConfig, width: int, layout: dict[str, tuple[int, int]]):
        super().__init__()
        dim, bottleneck = config.task_dim, config.bottleneck
        self.width, self.bottleneck, self.layout = width, bottleneck, dict(layout)
        self.scale = 1.0 / dim
        layers = 1 + max(layer for layer, _ in layout.values())
        positions = 1 + max(position for _, position in layout.values())
        self.layer_embedding = nn.Parameter(torch.randn(layers, dim))
        self.position_embedding = nn.Parameter(torch.randn(positions, dim))
        self.mix_in = nn.Linear(3 * dim, config.hidden_dim)
        self.mix_out = nn.Linear(config.hidden_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck * width)
        self.down_bias = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(dim, width * bottleneck)
        self.up_bias = nn.Linear(dim, width)
        # z has unit variance per component, so D's entries (G z / dim) start with standard deviation
        # 0.02 (a plain adapter's start); the up generators start at zero: a fresh adapter is the identity
        nn.init.normal_(self.down.weight, std=0.02 * math.sqrt(dim))
        for generator in (self.down_bias, self.up, self.up_bias):
            nn.init.zeros_(generator.weight)
        for generator in (self.down, self.down_bias, self.up, self.up_bias):
            nn.init.zeros_(generator.bias)
        if config.layer_norm:
            self.norm_weight = nn.Linear(dim, width)
            self.norm_bias = nn.Linear(dim, width)
            nn.init.zeros_(self.norm_weight.weight)
            nn.init.ones_(self.norm_weight.bias)
            nn.init.zeros_(self.norm_bias.weight)
            nn.init.zeros_(self.norm_bias.bias)

    def source(self, task: torch.Tensor, layer: int, position: int) -> torch.Tensor:
        """``z``: the shared summary of one (task, layer, position), width ``task_dim``."""
        joined = torch.cat([task, self.layer_embedding[layer], self.position_embedding[position]])
        return self.norm(self.mix_out(F.relu(self.mix_in(joined))))

    def generate(self, task: torch.Tensor, layer: int, position: int) -> dict[str, torch.Tensor]:
        """The adapter of one site: ``down (k, d)``, ``down_bias (k)``, ``up (d, k)``, ``up_bias (d)``
        and, with ``layer_norm``, ``norm_weight (d)`` and ``norm_bias (d)``."""
        z = self.source(task, layer, position)
        out = {"down": self._made(self.down, z).view(self.bottleneck, self.width), "down_bias": self._made(self.down_bias, z),
               "up": self._made(self.up, z).view(self.width, self.bottleneck), "up_bias": self._made(self.up_bias, z)}
        if hasattr(self, "norm_weight"):
            out["norm_weight"] = self._made(self.norm_weight, z)
            out["norm_bias"] = self._made(self.norm_bias, z)
        return out

    def _made(self, generator: nn.Linear, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, generator.weight) * self.scale + generator.bias

    def sha256(self) -> str:
        """A digest of every tensor (names, shapes, values): which hypernetwork a task was trained with."""
        hasher = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            value = tensor.detach().to("cpu", torch.float32).contiguous()
            hasher.update(f"{name}:{list(value.shape)};".encode())
            hasher.update(value.numpy().tobytes())
        return hasher.hexdigest()


class TaskRoot(DeltaUnit):
    """One task, installed on the model itself (path ``""``): its task embedding (the only
    tensor a task adds) and the hypernetwork it uses, owned (registered, trained and saved with
    this delta) or borrowed from the delta that owns it (neither trained nor saved here)."""

    def __init__(self, task_dim: int, network: HyperNetwork, *, owns: bool):
        super().__init__()
        self.task_embedding = nn.Parameter(torch.randn(task_dim))
        if owns:
            self.network = network
        else:
            object.__setattr__(self, "_borrowed", network)  # not a child: not this delta's parameters

    @property
    def hypernetwork(self) -> HyperNetwork:
        return self.network if "network" in self._modules else self._borrowed

    @property
    def owns(self) -> bool:
        return "network" in self._modules

    def watched(self) -> list[torch.Tensor]:
        """Every tensor the generated adapters depend on (for the no-grad cache)."""
        return [self.task_embedding, *self.hypernetwork.parameters()]

    def fingerprint_module(self, module, model):
        return None  # the adapted modules carry the base's identity


class HyperAdapterSite(DeltaUnit):
    """``y + U act(D h + b_D) + b_U`` on a module's output ``y``, with ``h = y`` (or
    ``LayerNorm_{gamma, beta}(y)``), the tensors generated for this site's (task, layer, position).
    The unit holds no tensor of its own."""

    def __init__(self, width: int, non_linearity: str):
        super().__init__()
        self.width = width
        self.act = ACTIVATIONS[non_linearity]()
        self.layer, self.position = 0, 0
        self._cache: tuple = ((), None)

    def bind(self, root: TaskRoot, layer: int, position: int) -> HyperAdapterSite:
        object.__setattr__(self, "_root", root)  # not a child: the root is a unit of its own
        self.layer, self.position = layer, position
        return self

    @property
    def root(self) -> TaskRoot:
        return self._root

    def weights(self) -> dict[str, torch.Tensor]:
        """This site's generated adapter; without grad, cached until a tensor it depends on changes."""
        if torch.is_grad_enabled():
            return self.root.hypernetwork.generate(self.root.task_embedding, self.layer, self.position)
        key = tuple((id(t), t._version, t.data_ptr()) for t in self.root.watched())
        if self._cache[0] != key:
            self._cache = (key, self.root.hypernetwork.generate(self.root.task_embedding, self.layer, self.position))
        return self._cache[1]

    def forward_post(self, module, args, kwargs, output):
        w = self.weights()
        h = output.to(w["down"].dtype)
        if "norm_weight" in w:
            h = F.layer_norm(h, (self.width,), w["norm_weight"], w["norm_bias"], NORM_EPS)
        update = F.linear(self.act(F.linear(h, w["down"], w["down_bias"])), w["up"], w["up_bias"])
        return output + update.to(output.dtype)

    @classmethod
    def mixed_post(cls, units, module, args, kwargs, output, routing):
        """Each row through its own task's generated adapter: batched products over per-row
        gathered tensors (bottlenecks padded with zeros, base rows get zeros). Deltas of different
        non-linearities or layer-norm settings run each on its own rows."""
        present = [u for u in units if u is not None]
        made = {id(u): u.weights() for u in present}
        if len({(type(u.act), "norm_weight" in made[id(u)]) for u in present}) > 1:
            return per_delta_post(units, module, args, kwargs, output, routing)
        batch = routing.index.numel()
        take = lambda key, fill=0.0: gathered(units, routing.index, lambda u: made[id(u)][key], fill)  # noqa: E731
        down, up = take("down"), take("up")  # (batch, k, d), (batch, d, k)
        rows = as_rows(output, batch).to(down.dtype)
        h = rows
        if "norm_weight" in made[id(present[0])]:
            h = F.layer_norm(rows, (rows.shape[-1],), eps=NORM_EPS) * take("norm_weight").unsqueeze(1) \
                + take("norm_bias").unsqueeze(1)
        hidden = present[0].act(torch.baddbmm(take("down_bias").unsqueeze(1), h, down.transpose(1, 2)))
        result = torch.baddbmm(rows + take("up_bias").unsqueeze(1), hidden, up.transpose(1, 2))
        return result.view(output.shape).to(output.dtype)

