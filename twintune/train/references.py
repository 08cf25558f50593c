"""A preference task's reference log-probabilities computed once per split instead of every step:
`task.precompute_reference: true` (the base with the method switched off) or `task.reference: RUN`
(another run's trained adapter, frozen). Each row (each answer of a pair) keeps its targets'
log-probabilities (`Encoded.reference`), which batches carry, so a step runs no reference forward.

They are cached on disk like the features (`$TWINTUNE_CACHE/references`), one safetensors file per
split, keyed by the model's files, the base's quantization and dtype, the reference's adapter (a
run's), and the split's token ids; an unreadable file is computed again, with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from twintune.data.batching import Encoded, eval_batches
from twintune.errors import TwintuneWarning
from twintune.formats.safetensors_io import read_safetensors, write_safetensors
from twintune.train.features import cache_root, hash_model_files


def split_rows(encoded: list[Encoded]) -> list[Encoded]:
    """Every row of a split: each pair's chosen and rejected answers, in order."""
    return [row for e in encoded for row in (e, e.rejected) if row is not None]


def fill_references(splits: dict[str, list[Encoded]], values: Callable, batch_size: int, identity: str) -> None:
    """Set each row's `reference` (its targets' reference log-probabilities) from the cache, or from
    `values(batch)` (the reference's per-target log-probabilities) and then into the cache; `identity`
    names the reference (the model, its quantization and dtype, a run's adapter)."""
    for split, encoded in splits.items():
        rows = split_rows(encoded)
        if not rows:
            continue
        path = cache_root() / "references" / f"{_key(identity, rows)}.safetensors"
        cached = _read(path, rows)
        if cached is None:
            cached = _compute(rows, values, batch_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, {"values": np.concatenate(cached), "counts": np.array([len(c) for c in cached])})
        for row, reference in zip(rows, cached):
            row.reference = reference


def _compute(rows: list[Encoded], values: Callable, batch_size: int) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(rows)
    alone = [dataclasses.replace(row, rejected=None, reference=None) for row in rows]  # one row each, not pairs
    for batch in eval_batches(alone, batch_size):
        per_target, owners = values(batch), batch.target_rows()
        for place, row in enumerate(batch.example_index):
            out[row] = per_target[owners == place]
    return out


def _read(path: Path, rows: list[Encoded]) -> list[np.ndarray] | None:
    if not path.exists():
        return None
    try:
        stored = read_safetensors(path)
        counts = stored["counts"].astype(np.int64)
        if counts.tolist() != [len(row.ids) - row.prompt_len for row in rows]:
            raise ValueError("they do not match the split's rows")
        return np.split(stored["values"], np.cumsum(counts)[:-1])
    except Exception as error:  # noqa: BLE001 - an unreadable cache file is recomputed, never trusted
        warnings.warn(f"the cached reference log-probabilities {path} are unreadable ({error}); computing them again.",
                      TwintuneWarning, stacklevel=3)
        return None


def _key(identity: str, rows: list[Encoded]) -> str:
    digest = hashlib.sha256(identity.encode())
    for row in rows:
        digest.update(np.asarray(row.ids, np.int64).tobytes() + f":{row.prompt_len};".encode())
    return digest.hexdigest()[:32]


def reference_identity(model_dir: Path, settings: str, adapter: Path | None = None) -> str:
    """What a reference's log-probabilities depend on besides the rows: the model's files, `settings`
    (quantization, dtype), and the adapter's files when the reference is another run."""
    digest = hashlib.sha256(settings.encode())
    hash_model_files(digest, Path(model_dir))
    if adapter is not None:
        for path in sorted(Path(adapter).iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()
