"""The public entry points, for use from Python.

Example:
    >>> from twintune.api import load_recipe, train
    >>> summary = train(load_recipe("recipes/demo-financial-sentiment.yaml"), backend="mlx", out_dir="runs/demo")
    >>> summary["val_accuracy"], summary["out_dir"]
"""

from twintune.formats.checkpoint import load_checkpoint
from twintune.recipe import load_recipe
from twintune.train.loop import evaluate, predict, prepare, train

__all__ = ["load_checkpoint", "load_recipe", "prepare", "train", "evaluate", "predict"]
