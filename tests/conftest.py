"""Shared fixtures: every test uses tiny GPT-Neo checkpoints written to disk and read back
through the real loading code."""

import os

# Tiny models run faster on one thread than fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _offline():
    """Tests never reach the network, as on CI."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from twintune.formats.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_window_dir(tmp_path_factory):
    """A tiny GPT-Neo whose local window (8) is shorter than the test sequences."""
    from twintune.formats.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-window") / "model", window_size=8, seed=1)
