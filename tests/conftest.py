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
