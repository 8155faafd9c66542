"""Closed-form trainable-parameter counts of the methods added after the founding six, one
function per method, computed by hand from the adapted modules' shapes (see closed_form.py)."""

from __future__ import annotations

from closed_form import _linear, closed_form  # noqa: F401
from torch import nn


@closed_form("loha")
def _loha(model, config, modules):
    """Four factors per module: W1a, W2a (out, r) and W1b, W2b (r, in)."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        r = (config.rank_pattern or {}).get(path, config.r)
        total += 2 * r * (fan_in + fan_out)
    return total


def _split(width: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of a width, from its description: ``factor`` itself when it divides the
    width; else the smallest divisor reaching the square root, or the largest divisor up to
    ``factor`` if that comes first; smaller member first."""
    if factor > 0 and width % factor == 0:
        return factor, width // factor
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    root = min(d for d in divisors if d * d >= width)
    m = min(root, max(d for d in divisors if factor <= 0 or d <= factor))
    return min(m, width // m), max(m, width // m)


@closed_form("lokr")
def _lokr(model, config, modules):
    """W1 (out_l, in_m) and W2 (out_k, in_n), each full or r (rows + columns) when low rank."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        r = (config.rank_pattern or {}).get(path, config.r)
        (out_l, out_k), (in_m, in_n) = _split(fan_out, config.decompose_factor), _split(fan_in, config.decompose_factor)
        low_w1 = config.decompose_both and r < max(out_l, in_m) / 2
        low_w2 = r < max(out_k, in_n) / 2
        total += r * (out_l + in_m) if low_w1 else out_l * in_m
        total += r * (out_k + in_n) if low_w2 else out_k * in_n
    return total
def _kinds_of(model, modules):
    """(role or 'linear', in, out) of each adapted linear module, the role read by deltatune.core.roles."""
    from deltatune.core.roles import ROLES, find_roles

    found = find_roles(model)
    role_of = {}
    for role in ROLES:
        for path in found.roles.get(role, ()):
            role_of.setdefault(path, role)
    return {p: (role_of.get(p, "linear"), *_linear(model.get_submodule(p))) for p in modules if p}


@closed_form("tiedlora")
def _tiedlora(model, config, modules):
    """A (r x in) and B (out x r) once per kind (role and shape), u (r) and v (out) per module."""
    kinds = _kinds_of(model, modules)
    shared = sum(("A" in config.trainable) * config.r * fan_in + ("B" in config.trainable) * fan_out * config.r
                 for _, fan_in, fan_out in set(kinds.values()))
    own = sum(("u" in config.trainable) * config.r + ("v" in config.trainable) * fan_out
              for _, _, fan_out in kinds.values())
    return shared + own


@closed_form("msplora")
def _msplora(model, config, modules):
    """r_global (in + out) per kind, r_group (in + out) per kind and group of group_size consecutive
    blocks, r_layer (in + out) per module."""
    from deltatune.core.roles import find_roles

    found = find_roles(model)
    kinds = _kinds_of(model, modules)
    seen: dict = {}
    groups = set()
    for path, kind in kinds.items():
        block = found.block_of.get(path)
        layer = found.blocks.index(block) if block is not None else seen.get(kind, 0)
        seen[kind] = seen.get(kind, 0) + 1
        groups.add((kind, layer // config.group_size))
    width = lambda kind: kind[1] + kind[2]  # noqa: E731
    return (sum(config.r_global * width(k) for k in set(kinds.values()))
            + sum(config.r_group * width(k) for k, _ in groups)
            + sum(config.r_layer * width(k) for k in kinds.values()))
@closed_form("oft")
def _oft(model, config, modules):
    """Per module: one strict upper triangle n(n-1)/2 per block (one in all with block_share),
    n = the block size (input width / r when r is given)."""
    total = 0
    for path in modules:
        fan_in = _linear(model.get_submodule(path))[0]
        size = fan_in // config.r if config.r is not None else (config.block_size or 32)
        total += (1 if config.block_share else fan_in // size) * size * (size - 1) // 2
    return total


@closed_form("ether")
def _ether(model, config, modules):
    """Per module: one normal u per block over the input width (``in`` numbers); ETHER+ also
    v there and u, v over the output width (``2 in + 2 out``)."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        total += fan_in if config.variant == "ether" else 2 * (fan_in + fan_out)
    return total
@closed_form("road")
def _road(model, config, modules):
    """RoAd: an angle and a scale per output pair (road_1), per output (road_2), or two per output (road_4)."""
    per_output = {"road_1": 1, "road_2": 2, "road_4": 4}[config.variant]  # angles + scales per output element
    return sum(per_output * _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("diablo")
def _diablo(model, config, modules):
    """DiaBlo: N diagonal blocks of (out/N) x (in/N) each, i.e. in * out / N per module."""
    total = 0
    for p in modules:
        fan_in, fan_out = _linear(model.get_submodule(p))
        total += config.num_blocks * (fan_out // config.num_blocks) * (fan_in // config.num_blocks)
    return total


@closed_form("paca")
def _paca(model, config, modules):
    """PaCA: an (out x k) block of trained columns per module."""
    return sum(config.k * _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("neuroada")
def _neuroada(model, config, modules):
    """NeuroAda: k bypass values per output neuron."""
    return sum(config.k * _linear(model.get_submodule(p))[1] for p in modules)
@closed_form("loraxs")
def _loraxs(model, config, modules):
    return len(modules) * config.r * config.r  # one r x r matrix per module; the SVD factors are frozen


@closed_form("eigenlora")
def _eigenlora(model, config, modules):
    return len(modules) * 2 * config.k * config.r  # loadings L_B (k, r) and L_A (r, k); the components are frozen


@closed_form("edora")
def _edora(model, config, modules):
    # an r x r matrix and a magnitude per output for each module
    return sum(config.r * config.r + _linear(model.get_submodule(p))[1] for p in modules)


@closed_form("abba")
def _abba(model, config, modules):
    # two trained pairs B_k (out, r_k), A_k (r_k, in) per module
    return sum((config.r1 + config.r2) * sum(_linear(model.get_submodule(p))) for p in modules)
@closed_form("adalora")
def _adalora(model, config, modules):
    """Q (r x in), lambda (r), P (out x r) per module, r from rank_pattern else init_r."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        rank = (config.rank_pattern or {}).get(path, config.init_r)
        total += rank * fan_in + rank + fan_out * rank
    return total


@closed_form("dylora")
def _dylora(model, config, modules):
    """A (r x in) and B (out x r) per module: every rank up to r shares them."""
    return sum(config.r * sum(_linear(model.get_submodule(path))) for path in modules)
@closed_form("vera")
def _vera(model, config, modules):
    """Per adapted layer: d (r) and b (out); the shared A and B are frozen."""
    return sum(config.r + _linear(model.get_submodule(p))[1] for p in modules if p)


@closed_form("vblora")
def _vblora(model, config, modules):
    """The shared bank (num_vectors x vector_length) plus, per adapted layer, logits over the
    bank for the r x in/L pieces of A and the out/L x r pieces of B."""
    pieces = sum(config.r * sum(_linear(model.get_submodule(p))) // config.vector_length for p in modules if p)
    return config.num_vectors * config.vector_length + pieces * config.num_vectors


@closed_form("adapterbias")
def _adapterbias(model, config, modules):
    """v (out) per module; alpha's w (in) and, where the module has a bias, c (1): per module, or
    once per (input width, bias) kind with share_alpha."""
    total, alphas = 0, []
    for path in modules:
        if not path:
            continue
        module = model.get_submodule(path)
        fan_in, fan_out = _linear(module)
        with_bias = bool(config.alpha_bias and getattr(module, "bias", None) is not None)
        total += fan_out
        alphas.append((fan_in, with_bias) if config.share_alpha else (path, fan_in, with_bias))
    return total + sum(kind[-2] + kind[-1] for kind in set(alphas))

@closed_form("hydra")
def _hydra(model, config, modules):
    """Parallel A_p (r_p x in), B_p (out x r_p) and sequential A_s (r_s x out), B_s (out x r_s) per module."""
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        total += config.r_parallel * (fan_in + fan_out) + config.r_sequential * 2 * fan_out
    return total

@closed_form("molora")
def _molora(model, config, modules):
    """Per module, E experts of A (r x in) and B (out x r) and a router (E x in); E from
    ``experts_per_layer`` by the block's depth in its stack (block i of n: entry i * len // n)."""
    from deltatune.core.roles import find_roles

    found = find_roles(model)
    total = 0
    for path in modules:
        fan_in, fan_out = _linear(model.get_submodule(path))
        experts = config.num_experts
        if config.experts_per_layer is not None:
            block = found.block_of[path]
            stack = [b for b in found.blocks if b.rpartition(".")[0] == block.rpartition(".")[0]]
            groups = config.experts_per_layer
            experts = groups[stack.index(block) * len(groups) // len(stack)]
        total += experts * (config.r * (fan_in + fan_out) + fan_in)
    return total

@closed_form("compacter")
def _compacter(model, config, modules):
    """Per adapted module of output width d, bottleneck k: the down and up B_i (n of them) as
    s_i (rows x r) t_i (r x cols), i.e. r (k + d) each, or n (k/n)(d/n) = k d / n each when not
    factorised, plus the biases (k + d); the A_i, n^3 numbers (n^2 + n^2 when factorised), once
    for all layers when shared, else twice per module."""
    from closed_form import _block

    n = config.phm_dim
    rule = 2 * n * n if config.factorized_phm_rule else n ** 3
    total = rule if config.shared_phm_rule else 0
    for path in (p for p in modules if p):
        module = model.get_submodule(path)
        width = (_block(module) if not hasattr(module, "weight") else _linear(module))[1]
        k = config.bottleneck or width // config.reduction_factor // config.phm_dim * config.phm_dim
        projections = 2 * config.phm_rank * (k + width) if config.factorized_phm_W else 2 * k * width // n
        total += projections + k + width + (0 if config.shared_phm_rule else 2 * rule)
    return total

@closed_form("sparseadapter")
def _sparseadapter(model, config, modules):
    """Per adapted module: the kept entries of the down (k x d_in) and up (d_out x k) weights,
    each numel - round(sparsity numel) (at least 1), plus the dense biases k + d_out; k is the
    bottleneck, round(bottleneck / (1 - sparsity)) under large_sparse."""
    from closed_form import _block

    k = max(1, round(config.bottleneck / (1 - config.sparsity))) if config.large_sparse else config.bottleneck
    total = 0
    for path in modules:
        module = model.get_submodule(path)
        fan_in, fan_out = _block(module) if not hasattr(module, "weight") else _linear(module)
        d_in = fan_in if config.placement == "parallel" else fan_out
        total += sum(max(1, n - round(config.sparsity * n)) for n in (k * d_in, fan_out * k)) + k + fan_out
    return total

@closed_form("reft")
def _reft(model, config, modules):
    """Per edited module: one edit (tied, or one kind of position) or two (prefix, suffix), each
    two (r, d) matrices and an r bias, d the module's output width (the hidden width of a block)."""
    from deltatune.core.roles import find_roles

    edits = 1 if config.tied_weights or not (config.prefix_positions and config.suffix_positions) else 2
    found = find_roles(model)
    total = 0
    for path in modules:
        module = model.get_submodule(path)
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            width = _linear(module)[1]
        else:
            width = found.hidden
        total += edits * config.r * (2 * width + 1)
    return total

@closed_form("hyperadapter")
def _hyperadapter(model, config, modules):
    """A sharing task: its task embedding alone. An owner adds the hypernetwork: a layer embedding
    per transformer block holding adapted modules (a module outside the blocks counts as one),
    a position embedding per adapted module of the fullest block, the mixing MLP [t; l; p] (3t)
    -> hidden -> t, its layer norm, and one generator (t -> n, with bias) per generated tensor:
    down (k d), down bias (k), up (d k), up bias (d) and, with layer_norm, gamma and beta (d each)."""
    from collections import Counter

    from closed_form import _block
    from deltatune.core.roles import find_roles

    t, h, k = config.task_dim, config.hidden_dim, config.bottleneck
    if config.shares is not None:
        return t
    sites = [p for p in modules if p]
    blocks = find_roles(model).blocks
    per_block = Counter(next((b for b in blocks if p.startswith(b + ".")), p) for p in sites)
    first = model.get_submodule(sites[0])
    d = (_linear(first) if hasattr(first, "weight") else _block(first))[1]
    generated = k * d + k + d * k + d + (2 * d if config.layer_norm else 0)
    network = (len(per_block) + max(per_block.values())) * t + (3 * t * h + h) + (h * t + t) + 2 * t
    return t + network + (t + 1) * generated

@closed_form("llamaadapter")
def _llamaadapter(model, config, modules):
    """Per adapted attention layer: an adapter_len x hidden prompt and one gate (or one per head)."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or c.d_model
    heads = getattr(c, "num_attention_heads", None) or c.num_heads
    return len(modules) * (config.adapter_len * hidden + (heads if config.gate_per_head else 1))

@closed_form("aligner")
def _aligner(model, config, modules):
    """num_tokens x hidden shared tokens (at the model, path ""), a gate per head (or one) per attention layer."""
    c = model.config
    hidden = getattr(c, "hidden_size", None) or c.d_model
    heads = getattr(c, "num_attention_heads", None) or c.num_heads
    layers = len([p for p in modules if p])
    return config.num_tokens * hidden + layers * (heads if config.gate_per_head else 1)
