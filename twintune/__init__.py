"""twintune: one PEFT API, two backends (MLX and PyTorch), proven identical."""

from twintune.errors import TwintuneError

__version__ = "0.1.0"
__all__ = ["TwintuneError", "__version__"]
