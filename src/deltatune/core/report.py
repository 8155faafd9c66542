"""What attach did, as data and as a printable table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SiteReport:
    path: str
    module_type: str
    parameters: int
    role: str = "adapted"


@dataclass(frozen=True)
class AttachReport:
    """The outcome of :func:`deltatune.attach` or :func:`deltatune.load`.

    Attributes:
        name: the delta's name.
        method: its method.
        sites: adapted modules (and extra trained modules, role ``"saved"``).
        skipped: ``(module path, reason)`` for matched modules the method cannot adapt.
        trainable: parameters of this delta.
        total: parameters of the whole model, deltas included.
    """

    name: str
    method: str
    sites: tuple[SiteReport, ...]
    skipped: tuple[tuple[str, str], ...] = field(default=())
    trainable: int = 0
    total: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def modules(self) -> list[str]:
        return [s.path for s in self.sites if s.role == "adapted"]

    def __str__(self) -> str:
        rows = [(s.path or "<model>", s.module_type, s.role, f"{s.parameters:,}") for s in self.sites]
        rows += [(path, "", f"skipped: {why}", "") for path, why in self.skipped]
        header = ("module", "type", "role", "params")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        out = [f"delta {self.name!r} ({self.method}): {len(self.modules)} modules adapted", line(header)]
        out += [line(r) for r in rows]
        out.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.4f}%)")
        return "\n".join(out)
