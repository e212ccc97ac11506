"""Shared fixtures. The suite gets a BentoML store of its own and a small model trained in it by
the real pipeline (a few hundred sentences, seconds), so tests never touch your `make model`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before bentoml is imported anywhere: its store location is read once.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="kubesentiment-test-bentoml-")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest

from models.pipeline import build
from models.store import StoredModel
from models.train import TrainConfig
from settings import get_settings

SMALL_LIMIT = 1000
SMALL_CONFIG = TrainConfig(epochs=1, learning_rate=1e-4, max_steps=25)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return get_settings().data_dir


@pytest.fixture(scope="session")
def small_model(data_dir: Path) -> StoredModel:
    return build("sentiment", data_dir, SMALL_CONFIG, limit=SMALL_LIMIT)
