"""A PNG of a run: training loss per step, and at each evaluation the validation loss (where the task
logs one) and the task's headline figure (validation accuracy; a preference task's
rewards/accuracies or margins; GRPO's reward; a causal LM's perplexity) on a second axis."""

from __future__ import annotations

from pathlib import Path

from twintune.formats.safetensors_io import write_atomically


def plot_run(path: str | Path, losses: list[float], evals: list[dict], title: str = "",
             metrics: tuple[str, ...] = ("val_accuracy",)) -> Path:
    """Write the plot (matplotlib, no display needed); `metrics` are the task's (its first besides
    val_loss goes on the second axis).

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
    loss_axis.set_ylabel("training loss", color="tab:blue")
    steps = [e["step"] for e in evals]
    if evals and "val_loss" in evals[0]:  # the validation loss on the same axis
        loss_axis.plot(steps, [e["val_loss"] for e in evals], "o-", color="tab:orange", label="validation loss")
        loss_axis.legend()
    headline = next((m for m in metrics if m != "val_loss" and evals and m in evals[0]), None)
    if headline:
        figure_axis = loss_axis.twinx()
        figure_axis.plot(steps, [e[headline] for e in evals], "s-", color="tab:green")
        figure_axis.set_ylabel(headline.removeprefix("val_").replace("_", " "), color="tab:green")
        if "accura" in headline:
            figure_axis.set_ylim(0, 1)
    loss_axis.set_title(title)
    figure.tight_layout()
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return Path(path)
