"""Safetensors read into numpy (bf16 included, which numpy lacks) and written atomically (JSON too)."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from twintune.errors import TwintuneError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: bf16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a .safetensors file into numpy; bfloat16 is widened to float32.

    Example:
        >>> from twintune.formats.tiny_model import builtin_model_dir
        >>> weights = read_safetensors(builtin_model_dir("tiny-gpt-neo") / "model.safetensors")
        >>> weights["transformer.wte.weight"].shape   # the tiny model's (vocabulary, width)
        (1024, 64)
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > os.path.getsize(path) - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= data.shape[0]:
                raise ValueError(f"tensor {name!r} lies past the end of the file")
            raw = data[start:end]
            if info["dtype"] == "BF16":
                array = bf16_to_float32(raw.view(np.uint16))
            elif info["dtype"] in _DTYPES:
                array = np.array(raw.view(_DTYPES[info["dtype"]]))
            else:
                raise ValueError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            tensors[name] = array.reshape(info["shape"])
        return tensors
    except FileNotFoundError:
        raise TwintuneError(f"weights file {path} does not exist.") from None
    except (ValueError, KeyError, TypeError, AttributeError, json.JSONDecodeError, struct.error) as e:
        raise TwintuneError(f"weights file {path} is corrupt or not safetensors ({e}).") from None


def write_atomically(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) then rename onto path, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    text = json.dumps(data, indent=2)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Write numpy arrays as safetensors, atomically.

    Example:
        >>> write_safetensors("adapter_model.safetensors", {"a": np.zeros((2, 3), np.float32)})
    """
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, array in arrays.items():
        if array.dtype not in _NAMES:
            raise TwintuneError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store.")
    write_atomically(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
