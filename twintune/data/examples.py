"""The unit of a labelled data set, shared by every source (sources.py, synthetic.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One labelled sentence."""

    text: str
    label: str
