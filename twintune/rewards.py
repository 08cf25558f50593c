"""Reward functions for GRPO (`task: {name: grpo, reward: python:twintune.rewards.upbeat}`), in TRL's
shape: `f(prompts, completions, **columns) -> list[float]`, one reward per completion, the prompt's
other data columns as keyword lists.

Example:
    >>> upbeat(["Net sales", "Costs"], [" rose 5 % .", " fell ."])
    [1.0, -1.0]
    >>> right_sentiment(["Sales rose .", "Sales rose ."], [" positive", " neutral"], label=["positive"] * 2)
    [1.0, 0.0]
"""

from __future__ import annotations

UP = ("rose", "increased", "grew", "higher", "rise", "increase")
DOWN = ("fell", "decreased", "declined", "lower", "cut", "reduction")


def upbeat(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """+1 for a completion that reports a rise (a word of UP), -1 for one that reports a fall (DOWN),
    0 for neither or both: "write upbeat financial news", the synthetic prompts' demo reward."""
    rewards = []
    for completion in completions:
        words = set(completion.lower().replace(",", " ").replace(".", " ").split())
        rewards.append(float(bool(words & set(UP))) - float(bool(words & set(DOWN))))
    return rewards


def right_sentiment(prompts: list[str], completions: list[str], label: list[str], **columns) -> list[float]:
    """1 for a completion whose first word is the prompt's `label` column (the synthetic questions'
    right answer), else 0."""
    return [float(bool(c.split()) and c.split()[0].strip(".,").lower() == lab.lower())
            for c, lab in zip(completions, label)]
