"""Versioned models in the BentoML model store.

One store entry holds every back end of one trained model (the PyTorch folder with its
tokenizer, the ONNX fp32 graph and its int8 twin), so a version number always names the same
weights whichever back end serves them. The metadata says what made the model and how well it
scores, so `bentoml models get sentiment:<version>` answers "where did this come from?".
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
from bentoml.exceptions import NotFound

PYTORCH_DIR = "pytorch"
ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"


@dataclass(frozen=True)
class StoredModel:
    tag: str
    path: Path
    metadata: dict[str, Any]

    @property
    def name(self) -> str:
        return self.tag.split(":")[0]

    @property
    def version(self) -> str:
        return self.tag.split(":")[1]

    @property
    def pytorch_dir(self) -> Path:
        return self.path / PYTORCH_DIR

    @property
    def tokenizer_file(self) -> Path:
        return self.pytorch_dir / "tokenizer.json"

    def onnx_file(self, quantized: bool) -> Path:
        return self.path / ONNX_DIR / (INT8_FILE if quantized else FP32_FILE)

    @classmethod
    def from_bentoml(cls, model: Any) -> StoredModel:
        """From what a `bentoml.models.BentoModel` class attribute resolves to."""
        return cls(str(model.tag), Path(model.path), dict(model.info.metadata))


def _storable(value: Any) -> Any:
    """BentoML metadata takes plain values only: drop the Nones (an unset option)."""
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value if v is not None]
    return value


def register(name: str, staging: Path, metadata: dict[str, Any]) -> StoredModel:
    """Copy a staging folder laid out like a stored model (pytorch/, onnx/) into the store."""
    for required in (
        Path(PYTORCH_DIR) / "tokenizer.json",
        Path(ONNX_DIR) / FP32_FILE,
        Path(ONNX_DIR) / INT8_FILE,
    ):
        if not (staging / required).exists():
            raise FileNotFoundError(f"cannot register {staging}: {required} is missing")
    with bentoml.models.create(
        name, labels={"task": "sentiment"}, metadata=_storable(metadata)
    ) as model:
        shutil.copytree(staging, model.path, dirs_exist_ok=True)
    return get(str(model.tag))


def get(tag: str) -> StoredModel:
    """A stored model by tag ('name' or 'name:version'; the bare name means latest)."""
    try:
        model = bentoml.models.get(tag)
    except NotFound as err:
        raise LookupError(
            f"model {tag!r} is not in the BentoML store; run `make model` to create it"
        ) from err
    return StoredModel.from_bentoml(model)


def find_by_recipe(name: str, recipe: str) -> StoredModel | None:
    """The newest stored model made from exactly this recipe, if any: what makes `make model`
    a no-op on the second run."""
    try:
        candidates = bentoml.models.list(name)
    except NotFound:
        return None
    matches = [m for m in candidates if m.info.metadata.get("recipe") == recipe]
    if not matches:
        return None
    newest = max(matches, key=lambda m: m.info.creation_time)
    return get(str(newest.tag))
