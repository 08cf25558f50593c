"""A PNG of a run: training loss per step and validation accuracy (a causal LM: validation loss) at
each evaluation."""

from __future__ import annotations

from pathlib import Path

from twintune.formats.safetensors_io import write_atomically


def plot_run(path: str | Path, losses: list[float], evals: list[dict], title: str = "") -> Path:
    """Write the plot (matplotlib, no display needed).

    Example:
        >>> plot_run("runs/plotted.png", [2.0, 1.5, 1.1], [{"step": 3, "val_accuracy": 0.6}], "demo").name
        'plotted.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, loss_axis = plt.subplots(figsize=(8, 4.5), dpi=100)
    loss_axis.plot(range(1, len(losses) + 1), losses, color="tab:blue", linewidth=1, label="training loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss (target tokens)", color="tab:blue")
    if evals and "val_loss" in evals[0]:  # a causal LM: its validation loss on the same axis
        loss_axis.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange",
                       label="validation loss")
        loss_axis.legend()
    else:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot([e["step"] for e in evals], [e["val_accuracy"] for e in evals], "o-", color="tab:orange",
                           label="validation accuracy")
        accuracy_axis.set_ylabel("validation accuracy", color="tab:orange")
        accuracy_axis.set_ylim(0, 1)
    loss_axis.set_title(title)
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return Path(path)
