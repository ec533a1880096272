"""Shared test set-up: the repository root on sys.path, one thread, and the fixtures several test files use.
Plain helper functions (a toy corpus, small built-in images) are in helpers.py."""

import os
import sys

import pytest
import torch

# Tests import the top-level modules (model.py, attention.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)  # tiny models: one thread is faster and leaves a core for DDP tests

from helpers import tiny_data_env, write_corpus  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A fresh data cache (token streams, vocabularies) for one test module."""
    return tmp_path_factory.mktemp("qt-cache")


@pytest.fixture(scope="module")
def tiny_env(cache_dir):
    """Token caches in `cache_dir`, 512 / 128 built-in images instead of 20,000 / 2,000, one thread. A module
    opts in with `pytestmark = pytest.mark.usefixtures("tiny_env")`."""
    with tiny_data_env(cache_dir):
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A toy English text file (helpers.write_corpus)."""
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt")
