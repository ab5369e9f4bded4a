"""Shared fixtures."""

import pytest

from tests.test_base_train import run_train, TINY


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """One NANOCHAT_BASE_DIR for all training runs: the first tiny run builds the corpus and
    trains the tokenizer."""
    base = tmp_path_factory.mktemp("nanochat_base")
    run_train(base, TINY + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "prep"])
    assert (base / "data" / "synthetic" / "entropy.json").exists()
    assert (base / "tokenizers" / "synthetic" / "tokenizer.json").exists()
    return base
