"""`twintune compare`: every method and task trained on one recipe's data, side by side.

Each entry (a method, a head, features, or a prompting baseline) is the recipe with a few keys
changed (ENTRIES); each runs in its own process, so its peak memory is its own, and writes its row
(rows/NAME-seedS/row.json) before the next starts: a failed entry is a row with its error sentence,
and `--resume` runs only the rows not yet finished. The data stay the same across seeds (data.seed
is fixed to the recipe's), so the spread over seeds is the methods' own: initialisation, order,
dropout, and for few-shot prompting which sentences are shown.

    $ twintune compare recipes/demo-financial-sentiment.yaml --methods lora,bitfit,zero-shot --seeds 3

writes compare.json (every row, and the table), compare.md (the table) and compare.png (accuracy
against trainable share, marker size by peak memory, colour by family) in --out.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from twintune.errors import TwintuneError
from twintune.machine import peak_rss_mb
from twintune.formats.adapter import write_json
from twintune.formats.safetensors_io import write_atomically
from twintune.methods import METHODS

FAMILIES = ("prompting", "head/features", "weight methods", "module methods", "full")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the comparison: the recipe overrides that make it, and for the prompting
    baselines the shots shown before each sentence instead of training (None: trained)."""
    name: str
    family: str
    overrides: tuple[str, ...]
    shots: int | None = None


# The prompting, head and features rows are the tasks' (no method trains); each method's rows come
# from its class (Method.comparisons: the keys and learning rate tests/methods/test_method_learning.py
# measured on the demo). The recipe's other keys (epochs, batch, data) are shared by all, so every
# entry gets the same budget. `--set NAME.KEY=VALUE` changes one entry.
TASK_ENTRIES = (
    Entry("zero-shot", "prompting", ("method={name: none}",), shots=0),
    Entry("few-shot", "prompting", ("method={name: none}",), shots=4),
    Entry("head", "head/features", ("method={name: none}", "task={name: classification, head: linear}", "train.lr=3e-3")),
    Entry("features", "head/features", ("method={name: none}", "task={name: features, pooling: mean}")),
)


def method_entries() -> list[tuple[Entry, bool]]:
    """Every method's comparison rows, family by family (FAMILIES' order), with whether each is a default."""
    rows = [(comparison, name) for name, cls in METHODS.items() for comparison in vars(cls).get("comparisons", ())]
    rows.sort(key=lambda row: FAMILIES.index(row[0].family))
    return [(Entry(c.entry, c.family, (f"method={json.dumps({'name': name, **c.keys})}", f"train.lr={c.lr}")),
             c.default) for c, name in rows]


ENTRIES: dict[str, Entry] = {e.name: e for e in (*TASK_ENTRIES, *(entry for entry, _ in method_entries()))}
DEFAULT_METHODS = (*(entry.name for entry, default in method_entries() if default), "head", "features", "zero-shot",
                   "few-shot")
RECIPE_SECTIONS = ("name", "model", "backend", "seed", "dtype", "data", "prompt", "task", "method", "quantize", "train")


def choose_entries(methods: str) -> list[Entry]:
    """The entries a comma-separated --methods names, in its order; a name it does not know is one sentence."""
    names = [n.strip() for n in methods.split(",") if n.strip()]
    if not names:
        raise TwintuneError("--methods names no method; e.g. --methods lora,bitfit,zero-shot.")
    for name in names:
        if name not in ENTRIES:
            close = difflib.get_close_matches(name, ENTRIES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TwintuneError(f"--methods: {name!r} is not a comparison entry{hint} (entries: {', '.join(ENTRIES)}).")
    if len(set(names)) != len(names):
        raise TwintuneError(f"--methods names an entry twice: {', '.join(n for n in names if names.count(n) > 1)}.")
    return [ENTRIES[n] for n in names]


def entry_overrides(entry: Entry, recipe_seed: int, seed: int, overrides: list[str]) -> list[str]:
    """The overrides that make one row: the entry's own, the data fixed to the recipe's seed, the
    row's seed, then --set values: `KEY=V` for every entry, `NAME.KEY=V` for entry NAME only (a KEY
    that is no recipe section is the method's: `lora.r=16` is `method.r=16` for lora)."""
    shared, own = [], []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        first, _, rest = key.partition(".")
        if is_recipe_key(key) or "=" not in item:
            shared.append(item)
        elif first not in ENTRIES:
            raise TwintuneError(f"--set {item!r}: {first!r} is neither a recipe section ({', '.join(RECIPE_SECTIONS)}) "
                                f"nor a comparison entry; scope a value to one entry as ENTRY.KEY=VALUE, e.g. lora.r=16.")
        elif first == entry.name:
            if not rest:
                raise TwintuneError(f"--set {item!r}: name a key after {first!r}, e.g. {first}.train.lr=1e-3.")
            section = rest.split(".", 1)[0]
            own.append(f"{rest if section in RECIPE_SECTIONS else 'method.' + rest}={item.split('=', 1)[1]}")
    return [*entry.overrides, f"data.seed={recipe_seed}", f"seed={seed}", *shared, *own]


def is_recipe_key(key: str) -> bool:
    """Whether a --set key is the recipe's (for every entry) rather than one entry's. `prompt` is both a
    recipe section (template, labels) and an entry (prompt tuning): its own keys decide."""
    from twintune.recipe import PromptConfig

    first, _, rest = key.partition(".")
    if first == "prompt":
        return rest.split(".", 1)[0] in {f.name for f in dataclasses.fields(PromptConfig)}
    return first in RECIPE_SECTIONS


def check_scoped_overrides(entries: list[Entry], overrides: list[str]) -> None:
    """A --set scoped to an entry the comparison does not run is a mistake worth one sentence."""
    names = {e.name for e in entries}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        first = key.split(".", 1)[0]
        if not is_recipe_key(key) and first in ENTRIES and first not in names:
            raise TwintuneError(f"--set {item!r} is for entry {first!r}, which --methods does not run.")


# ---- one row, in its own process -------------------------------------------------------------------

def run_row(spec: dict) -> dict:
    """Train (or, for a prompting baseline, only evaluate) one entry and measure it: the row."""
    from twintune.recipe import load_recipe

    started = time.perf_counter()
    recipe = load_recipe(spec["recipe"], spec["overrides"])
    out = Path(spec["dir"]) / "run"
    if spec["shots"] is not None:
        row = _prompting_row(recipe, spec["backend"], spec["shots"])
    else:
        row = _trained_row(recipe, spec["backend"], out, spec["progress"])
    row["estimate_mb"] = None if spec["shots"] is not None else _estimate(spec)
    row["optimizer"] = None if spec["shots"] is not None else recipe.train.optimizer.name
    row["model_parameters"] = _model_parameters(recipe.model)
    row["total_seconds"] = time.perf_counter() - started
    return row


def _trained_row(recipe, backend: str, out: Path, progress: bool) -> dict:
    from twintune.train.loop import train
    from twintune.train.runs import evaluate_target

    summary = train(recipe, backend, out, progress=progress, overwrite=True)  # a row left unfinished is run again
    peak_rss = peak_rss_mb()  # before evaluating: the training's peak
    report = evaluate_target(out, "test", backend)
    saved = out / ("classifier" if (out / "classifier").exists() else "adapter")
    steps = summary["steps"]
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "test_examples": report["examples"],
            "trainable_parameters": summary["trainable_params"],
            "adapter_bytes": sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()),
            "peak_rss_mb": peak_rss, "backend_peak_mb": summary["framework_peak_memory_mb"], "steps": steps,
            "train_seconds": summary["train_seconds"],
            "seconds_per_step": summary["train_seconds"] / steps if steps else None,
            "tokens_per_second": summary.get("real_tokens_per_second")}


def _prompting_row(recipe, backend: str, shots: int) -> dict:
    from twintune.train.build import prepare
    from twintune.train.evaluate import evaluate_with_shots

    run = prepare(recipe, backend)
    if not run.splits.get("test"):
        raise TwintuneError("the test split is empty; set data.test_fraction in the recipe.")
    started = time.perf_counter()
    report = evaluate_with_shots(run, "test", shots)
    return {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "test_examples": len(run.splits["test"]),
            "shots": report.shots, "shots_note": report.shots_note, "trainable_parameters": 0,
            "adapter_bytes": 0, "peak_rss_mb": peak_rss_mb(), "backend_peak_mb": run.backend.framework_peak_mb(),
            "steps": 0, "train_seconds": 0.0, "seconds_per_step": None, "tokens_per_second": None,
            "eval_seconds": time.perf_counter() - started}


def _estimate(spec: dict) -> float | None:
    """`twintune estimate`'s training peak for the row's recipe (GPT-Neo models; None otherwise)."""
    from twintune.memory import estimate_recipe

    try:
        rows, _ = estimate_recipe(spec["recipe"], spec["overrides"], None, spec["backend"])
    except TwintuneError:
        return None
    return dict(rows).get("training peak")


def _model_parameters(model: str) -> int | None:
    from twintune.formats.checkpoint import load_config
    from twintune.models import GPTNeoSpec

    config = load_config(model)
    if config.get("model_type") != "gpt_neo":
        return None
    return sum(int(_product(shape)) for shape in GPTNeoSpec.from_config(config).weight_shapes().values())


def _product(shape: tuple[int, ...]) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def row_main(directory: str) -> int:
    """The row process (`python -m twintune.compare ROW_DIR`): reads spec.json, writes row.json,
    which holds the error sentence when the entry fails."""
    directory = Path(directory)
    spec = json.loads((directory / "spec.json").read_text())
    try:
        row = {"status": "ok", **run_row(spec)}
    except TwintuneError as error:
        row = {"status": "failed", "error": str(error)}
    except Exception as error:  # noqa: BLE001 - any failure is this row's, not the comparison's
        row = {"status": "failed", "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    write_json(directory / "row.json", {"entry": spec["entry"], "family": spec["family"], "seed": spec["seed"],
                                        "backend": spec["backend"], **row})
    return 0 if row["status"] == "ok" else 2


# ---- the comparison ----------------------------------------------------------------------------------

def compare(recipe_path: str, methods: str = ",".join(DEFAULT_METHODS), backend: str | None = None, seeds: int = 1,
            out_dir: str | Path | None = None, overrides: list[str] = (), resume: bool = False, shots: int = 4,
            progress: bool = True, log=sys.stderr) -> dict:
    """Run every entry (each seed) in its own process and write compare.json, compare.md and compare.png.

    Example:
        >>> result = compare("recipes/demo-financial-sentiment.yaml", "lora,zero-shot", "torch", seeds=1,
        ...                  out_dir="runs/compare", overrides=["train.max_steps=5"], progress=False)
        >>> [row["entry"] for row in result["table"]]
        ['lora', 'zero-shot']
    """
    from twintune.backends import resolve_backend_name
    from twintune.recipe import load_recipe

    if seeds < 1:
        raise TwintuneError(f"--seeds must be 1 or more, got {seeds}.")
    if shots < 1:
        raise TwintuneError(f"--shots is the few-shot entry's sentences of each class: 1 or more, got {shots} "
                            "(the zero-shot entry shows none).")
    entries = [dataclasses.replace(e, shots=shots) if e.name == "few-shot" else e for e in choose_entries(methods)]
    check_scoped_overrides(entries, list(overrides))
    shared = [o for o in overrides if is_recipe_key(o.split("=", 1)[0].strip())]
    recipe = load_recipe(recipe_path, shared)  # the recipe and every shared value are checked before any row runs
    name = resolve_backend_name(backend or recipe.backend)
    out = Path(out_dir) if out_dir else Path("runs") / f"compare-{recipe.name}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "compare.json").exists() and not resume:
        raise TwintuneError(f"{out} already holds a comparison; add --resume to finish it, or choose another --out.")
    jobs = [(entry, recipe.seed + i, entry_overrides(entry, recipe.data_seed, recipe.seed + i, list(overrides)))
            for entry in entries for i in range(seeds)]
    for entry, _, entry_keys in jobs[::seeds]:  # each entry's recipe checked before any row runs
        load_recipe(recipe_path, entry_keys)
    rows, durations = [], []
    for number, (entry, seed, entry_keys) in enumerate(jobs, 1):
        directory = out / "rows" / f"{entry.name}-seed{seed}"
        done = _finished_row(directory) if resume else None
        if done:
            rows.append(done)
            continue
        left = f", about {_minutes(statistics.mean(durations) * (len(jobs) - number + 1))} left" if durations else ""
        print(f"compare [{number}/{len(jobs)}] {entry.name} seed {seed} on {name}{left}", file=log, flush=True)
        started = time.perf_counter()
        rows.append(_run_row_process(directory, {
            "entry": entry.name, "family": entry.family, "seed": seed, "backend": name, "recipe": str(recipe_path),
            "overrides": entry_keys, "shots": entry.shots,
            "dir": str(directory), "progress": progress}))
        durations.append(time.perf_counter() - started)
        row = rows[-1]
        outcome = f"accuracy {row['accuracy']:.3f}" if row["status"] == "ok" else f"FAILED: {row['error']}"
        print(f"compare   {entry.name} seed {seed}: {outcome} ({durations[-1]:.0f} s)", file=log, flush=True)
    from twintune.machine import cpu_info

    result = {"recipe": str(recipe_path), "recipe_name": recipe.name, "backend": name, "seeds": seeds,
              "methods": [e.name for e in entries], "overrides": list(overrides), "shots": shots,
              "machine": {**cpu_info(), "cores": os.cpu_count(), "platform": sys.platform},
              "table": summarise(rows, entries), "rows": rows}
    write_json(out / "compare.json", result)
    write_atomically(out / "compare.md", lambda tmp: Path(tmp).write_text(markdown_table(result)))
    plot_comparison(out / "compare.png", result)
    result["out_dir"] = str(out)
    return result


def _finished_row(directory: Path) -> dict | None:
    try:
        row = json.loads((directory / "row.json").read_text())
    except (OSError, ValueError):
        return None
    return row if row.get("status") == "ok" else None  # a failed row runs again: its cause may be fixed


def _run_row_process(directory: Path, spec: dict) -> dict:
    """One row in a fresh process (its own peak memory); a process that dies without a row is a failed row."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "row.json").unlink(missing_ok=True)
    write_json(directory / "spec.json", spec)
    code = subprocess.run([sys.executable, "-m", "twintune.compare", str(directory)]).returncode
    row = None
    try:
        row = json.loads((directory / "row.json").read_text())
    except (OSError, ValueError):
        pass
    if row is None:
        row = {"entry": spec["entry"], "family": spec["family"], "seed": spec["seed"], "backend": spec["backend"],
               "status": "failed", "error": f"its process ended with exit code {code} before writing a result."}
    return row


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


# ---- the table and the plot ---------------------------------------------------------------------------

MEASURES = ("accuracy", "macro_f1", "trainable_parameters", "adapter_bytes", "peak_rss_mb", "estimate_mb",
            "seconds_per_step", "tokens_per_second", "total_seconds")


def summarise(rows: list[dict], entries: list[Entry]) -> list[dict]:
    """One line per entry: each measure's mean over the seeds that finished (and the standard
    deviation of accuracy and macro-F1), the share of the model trained, and the failures' sentences."""
    table = []
    for entry in entries:
        own = [r for r in rows if r["entry"] == entry.name]
        ok = [r for r in own if r["status"] == "ok"]
        line = {"entry": entry.name, "family": entry.family, "seeds": len(own), "finished": len(ok),
                "errors": sorted({r["error"] for r in own if r["status"] != "ok"}),
                "optimizer": next((r.get("optimizer") for r in ok if r.get("optimizer")), None)}
        for measure in MEASURES:
            values = [r[measure] for r in ok if r.get(measure) is not None]
            line[measure] = statistics.mean(values) if values else None
        for measure in ("accuracy", "macro_f1"):
            values = [r[measure] for r in ok]
            line[f"{measure}_std"] = statistics.stdev(values) if len(values) > 1 else None
        model = next((r["model_parameters"] for r in ok if r.get("model_parameters")), None)
        trained = line["trainable_parameters"]
        line["trainable_percent"] = 100 * trained / model if model and trained is not None else None
        table.append(line)
    return table


def markdown_table(result: dict) -> str:
    """compare.md: which backend, recipe, seeds and machine, then one row per entry."""
    m = result["machine"]
    lines = [f"# twintune compare: {result['recipe_name']} on {result['backend']}", "",
             f"Recipe `{result['recipe']}`, {result['seeds']} seed(s) each, backend **{result['backend']}**; "
             f"machine {m['cpu_model']}, {m['cores']} cores, CPU flags: {' '.join(m['cpu_flags']) or 'none'}.",
             "Accuracy and macro-F1 on the test split (mean ± std over seeds); peak RSS is the row's own process; "
             "the estimate is `twintune estimate`'s training peak at data.max_length (framework memory not included).",
             "",
             "| entry | family | optimizer | accuracy | macro-F1 | trainable | % of model | saved | peak RSS MB "
             "| estimate MB | s/step | tokens/s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in result["table"]:
        if not line["finished"]:
            lines.append(f"| {line['entry']} | {line['family']} | | failed: {'; '.join(line['errors'])} "
                         "| | | | | | | | | |")
            continue
        cells = [line["entry"], line["family"], line.get("optimizer") or "–", _mean_std(line, "accuracy"), _mean_std(line, "macro_f1"),
                 f"{line['trainable_parameters']:,.0f}", _number(line["trainable_percent"], "{:.3g}"),
                 _size(line["adapter_bytes"]), _number(line["peak_rss_mb"], "{:.0f}"),
                 _number(line["estimate_mb"], "{:.0f}"), _number(line["seconds_per_step"], "{:.3f}"),
                 _number(line["tokens_per_second"], "{:.0f}"), _number(line["total_seconds"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
        if line["errors"]:
            lines.append(f"| {line['entry']} (failed seeds) | | | {'; '.join(line['errors'])} | | | | | | | | | |")
    return "\n".join(lines) + "\n"


def _mean_std(line: dict, measure: str) -> str:
    std = line[f"{measure}_std"]
    return f"{line[measure]:.3f}" + (f" ± {std:.3f}" if std is not None else "")


def _number(value, form: str) -> str:
    return "–" if value is None else form.format(value)


def _size(n: float) -> str:
    if not n:
        return "–"
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.0f} KB"


def plot_comparison(path: str | Path, result: dict) -> Path:
    """Accuracy against the share of the model trained (log scale; untrained baselines at the left
    edge), marker area by peak memory, one colour per family, the spread over seeds as error bars."""
    import matplotlib.pyplot as plt

    figure = comparison_figure(result)
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
    return Path(path)


def comparison_figure(result: dict):
    """compare.png's figure (matplotlib's Agg): the legend sits outside the axes, where it covers no point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [line for line in result["table"] if line["finished"]]
    shares = [line["trainable_percent"] for line in lines if line["trainable_percent"]]
    floor = min(shares) / 10 if shares else 1e-3
    peaks = [line["peak_rss_mb"] or 0 for line in lines]
    biggest = max(peaks, default=1) or 1
    colours = dict(zip(FAMILIES, ("tab:gray", "tab:purple", "tab:blue", "tab:orange", "tab:red")))
    figure, axis = plt.subplots(figsize=(9, 5.5), dpi=100)
    for line, peak in zip(lines, peaks):
        x = line["trainable_percent"] or floor
        axis.errorbar(x, line["accuracy"], yerr=line["accuracy_std"] or 0, fmt="none", ecolor="black", alpha=0.5)
        axis.scatter(x, line["accuracy"], s=40 + 400 * peak / biggest, color=colours[line["family"]], alpha=0.7,
                     edgecolors="black", label=line["family"])
        axis.annotate(line["entry"], (x, line["accuracy"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    handles, labels = axis.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axis.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                fontsize=8, markerscale=0.5)
    axis.set_xscale("log")
    axis.set_xlabel(f"trainable parameters, % of the model (log; untrained at {floor:.2g})")
    axis.set_ylabel("test accuracy")
    axis.set_title(f"{result['recipe_name']} on {result['backend']}: {result['seeds']} seed(s); marker area: peak memory")
    figure.tight_layout()
    return figure


if __name__ == "__main__":
    sys.exit(row_main(sys.argv[1]))
