"""Shared pytest fixtures. Everything runs offline on CPU."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny LLaVA teacher/student pair written once per session (same code as the CLI).

    Returns a ``distill.models.tiny.TinyPair`` with ``.teacher`` and ``.student`` folder paths
    (``pathlib.Path``) and ``.root``. Treat the folders as read-only: copy before modifying.
    """
    from distill.models.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny_models"), seed=0)


# Multi-process / end-to-end modules: part of `make test` (CI), left out of `make test-quick`.
SLOW_MODULES = {"test_demo", "test_multinode", "test_train", "test_engine", "test_checkpoint",
                "test_visual_triton", "test_gpu_check", "test_fused_zero3", "test_gpu_e2e", "test_families_zero3"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or end-to-end test (skipped by make test-quick)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
