"""Fixtures shared by the test modules (plain helpers are in ``helpers.py``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import WORDS, random_words


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> tuple[Path, Path]:
    """Random-word text files ``(train, held_out)`` of 6000 and 3000 words, seed 0."""
    d = tmp_path_factory.mktemp("text")
    rng = random.Random(0)
    train, held_out = d / "train.txt", d / "eval.txt"
    train.write_text(random_words(rng, 6000))
    held_out.write_text(random_words(rng, 3000))
    return train, held_out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Calibration and held-out text: lines of 80-120 words (longer than the windows)."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    train, held_out = d / "train.txt", d / "held_out.txt"
    train.write_text("\n".join(random_words(rng, rng.randint(80, 120)) for _ in range(160)))
    held_out.write_text("\n".join(random_words(rng, 100, WORDS) for _ in range(20)))
    return train, held_out


@pytest.fixture
def one_thread():
    """One torch thread for the test (small tensors on a shared machine: threads only add
    contention). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
