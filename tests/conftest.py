"""Shared fixtures: every test uses tiny GPT-Neo checkpoints written to disk and read back
through the real loading code."""

import os

# Tiny models run faster on one thread than fighting over two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# MLX's Linux wheel ships the reference BLAS: bind its matrix products to torch's BLAS
# (twintune/backends/mlx/__init__.py), about 3x faster MLX steps. Set before anything imports mlx;
# subprocesses (the CLI tests) inherit it. TWINTUNE_MLX_BLAS=bundled keeps MLX's own.
os.environ.setdefault("TWINTUNE_MLX_BLAS", "torch")
import twintune.backends.mlx  # noqa: E402,F401  (binds now, before any test module imports mlx)

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


# Skips are for absent hardware only. A test skipped for anything else (a missing package, say)
# fails instead: on a fresh machine a skip would silently test nothing.
HARDWARE_WORDS = ("metal", "apple gpu", "cuda")


def _fail_a_skip_without_hardware_reason(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(word in reason.lower() for word in HARDWARE_WORDS):
            report.outcome = "failed"
            report.longrepr = f"skipped for a reason that is not absent hardware (Metal, CUDA): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_a_skip_without_hardware_reason(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a whole module skipped at import (pytest.importorskip) lands here
    _fail_a_skip_without_hardware_reason(outcome.get_result())
