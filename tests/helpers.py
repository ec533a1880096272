"""Small fixtures-as-functions shared by the tests: a toy English corpus and a small built-in image set."""

import contextlib
import functools
import inspect
import random

import pytest
import torch

import data

WORDS = ("the cat dog sat on a mat and ran to house with big small red blue tree under over near far quick slow "
         "bird sang while it was raining in spring").split()


def corpus_lines(n_lines=600, seed=0):
    """A deterministic toy English text: ~35 KB, a ~90-token vocabulary, plenty of '.' and ','."""
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(5, 14))).capitalize() + ", "
            + " ".join(r.choice(WORDS) for _ in range(3)) + "." for _ in range(n_lines)]


def write_corpus(path, n_lines=600, seed=0):
    path.write_text("\n".join(corpus_lines(n_lines, seed)) + "\n")
    return path


_load_image_data = data.load_image_data


@functools.lru_cache(maxsize=None)
def _small_images(*args):
    return _load_image_data(*args)


def small_image_loader(n_train=512, n_valid=128):
    """A stand-in for data.load_image_data that makes n_train / n_valid built-in images (once per argument set);
    the real function's signature is enforced, so a wrong call still fails."""
    def load(*args, **kwargs):
        bound = inspect.signature(_load_image_data).bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments.update(n_train=n_train, n_valid=n_valid)
        return _small_images(*bound.args)
    return load


@contextlib.contextmanager
def tiny_data_env(cache_dir, n_train=512, n_valid=128):
    """Token caches in `cache_dir`, n_train / n_valid built-in images instead of 20,000 / 2,000 (same generator),
    and one thread (tiny models run fastest on one, and several times slower on two when another job holds a
    core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(data, "DEFAULT_CACHE_DIR", cache_dir)
        m.setattr(data, "load_image_data", small_image_loader(n_train, n_valid))
        yield
    torch.set_num_threads(n)
