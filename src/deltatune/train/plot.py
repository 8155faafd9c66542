"""``loss.png``: training loss (and its moving average) with validation loss."""

from __future__ import annotations

from pathlib import Path


def plot_losses(history, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if history.train:
        steps, losses = zip(*history.train)
        axis.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="train loss")
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        axis.plot(steps, smooth, color="#08519c", linewidth=1.5, label=f"train loss (mean of {window})")
    if history.validation:
        steps = [s for s, _ in history.validation]
        axis.plot(steps, [m["loss"] for _, m in history.validation], "o-", color="#e6550d", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=100)
    plt.close(figure)
    tmp.replace(path)
