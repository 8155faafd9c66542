"""Non-IID client partitions of a task's splits: each client sees a skewed share of the data.

- :func:`label_skew` (classification): for each label, the share each client receives is drawn
  from a symmetric Dirichlet(``alpha``) (Hsu et al., 2019, arXiv:1909.06335). Small ``alpha``
  gives clients mostly one label; large ``alpha`` approaches an even, IID split.
- :func:`group_skew` (causal LM): whole groups (chatterbot's categories) are dealt to clients,
  so each client talks about its own topics.

A client's test rows follow the same rule as its training rows (the same label shares, the
same groups), so its personal delta is measured on data like its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.datasets import Example, Splits
from ..errors import ConfigError


@dataclass(frozen=True)
class Partition:
    """Row indices of one client's share of the train and test splits."""

    train: tuple[int, ...]
    test: tuple[int, ...]


def check_clients(clients: int, alpha: float) -> None:
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients must be a positive integer, got {clients!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"alpha (the Dirichlet concentration of the label skew) must be > 0, got {alpha!r}; "
                          f"e.g. 0.5 (skewed) or 100 (close to IID)")


def partition(splits: Splits, clients: int, alpha: float = 0.5, seed: int = 0) -> list[Partition]:
    """Each client's rows of ``splits.train`` and ``splits.test``: label skew for a classifier,
    group skew for a causal LM (or label skew over a single pseudo-label when there are no groups).

    Raises:
        ConfigError: bad ``clients``/``alpha``, or a client would get no training rows.
    """
    check_clients(clients, alpha)
    if splits.task == "classification":
        parts = label_skew([e.label for e in splits.train], [e.label for e in splits.test], clients, alpha, seed)
    else:
        parts = group_skew([_group(e) for e in splits.train], [_group(e) for e in splits.test], clients, seed)
    empty = [i for i, p in enumerate(parts) if not p.train]
    if empty:
        raise ConfigError(f"client(s) {empty} get no training rows with {clients} clients (alpha {alpha}) on "
                          f"{len(splits.train)} training rows; use fewer clients or a larger alpha")
    return parts


def _group(example: Example) -> str:
    return example.group or ""


def label_skew(train: list, test: list, clients: int, alpha: float, seed: int) -> list[Partition]:
    """Per label, Dirichlet(``alpha``) shares over clients; the same shares cut the test rows."""
    rng = random.Random(seed)
    train_rows: list[list[int]] = [[] for _ in range(clients)]
    test_rows: list[list[int]] = [[] for _ in range(clients)]
    for label in sorted(set(train) | set(test), key=str):
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]  # normalised Gammas: a Dirichlet sample
        total = sum(draws)
        shares = [d / total for d in draws] if total > 0 else [1.0 / clients] * clients
        for rows, values in ((train_rows, train), (test_rows, test)):
            _deal([i for i, v in enumerate(values) if v == label], shares, rows, random.Random(f"{seed}:{label}"))
    return [Partition(tuple(sorted(a)), tuple(sorted(b))) for a, b in zip(train_rows, test_rows)]


def _deal(rows: list[int], shares: list[float], out: list[list[int]], rng: random.Random) -> None:
    """Shuffle ``rows`` and cut them into consecutive pieces sized by ``shares`` (largest remainders)."""
    rng.shuffle(rows)
    exact = [share * len(rows) for share in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: len(rows) - sum(counts)]:
        counts[i] += 1
    start = 0
    for client, count in enumerate(counts):
        out[client].extend(rows[start:start + count])
        start += count


def group_skew(train: list[str], test: list[str], clients: int, seed: int) -> list[Partition]:
    """Whole groups dealt to clients in a seeded order (round robin); with fewer groups than
    clients, a group's rows are shared by the clients it is dealt to."""
    groups = sorted(set(train))
    random.Random(seed).shuffle(groups)
    owners: dict[str, list[int]] = {g: [] for g in groups}
    for i in range(max(len(groups), clients)):
        owners[groups[i % len(groups)]].append(i % clients)
    train_rows: list[list[int]] = [[] for _ in range(clients)]
    test_rows: list[list[int]] = [[] for _ in range(clients)]
    for rows, values in ((train_rows, train), (test_rows, test)):
        for group, members in owners.items():
            members = sorted(set(members))
            for k, row in enumerate(i for i, v in enumerate(values) if v == group):
                rows[members[k % len(members)]].append(row)
    return [Partition(tuple(sorted(a)), tuple(sorted(b))) for a, b in zip(train_rows, test_rows)]
