"""The FastAPI peer: what the seed project described, a FastAPI app around a transformers
`pipeline("text-classification")` on the PyTorch model, one text per request.

    PEER_MODEL_DIR=.../pytorch PEER_LABELS=NEGATIVE,POSITIVE PEER_MAX_LENGTH=128 \\
        uvicorn fastapi_app:app --host 127.0.0.1 --port 3200 --workers 1

`POST /predict` with `{"text": "..."}` answers `{"label": ..., "score": ...}`; `GET /health`.

Runs in its own virtual environment (loadtests/peers/fastapi.txt) with this folder and the
project's root on PYTHONPATH: the stored PyTorch folder names our mean-pooling architecture,
which `runners.architecture` registers with transformers' Auto classes when imported.

Settings, and why:
- One uvicorn worker, as the seed ran it; torch's default of one thread per core.
- A plain `def` endpoint: FastAPI's advice for blocking code is to let its thread pool run it,
  so the event loop keeps accepting requests while the model works.
- `truncation=True, max_length=...` at the model's max_length (its metadata), the pipeline's
  softmax scores, labels from the model's config, checked against its metadata at start.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

import runners.architecture  # noqa: F401  (registers the model's architecture)

MODEL_DIR = os.environ["PEER_MODEL_DIR"]
LABELS = os.environ["PEER_LABELS"].split(",")
MAX_LENGTH = int(os.environ["PEER_MAX_LENGTH"])

classifier = pipeline("text-classification", model=MODEL_DIR, device="cpu")
id2label: dict[Any, str] = dict(classifier.model.config.id2label or {})
config_labels = [id2label[i] for i in range(len(id2label))]
if config_labels != LABELS:
    raise RuntimeError(f"the model's config labels {config_labels} differ from {LABELS}")

app = FastAPI(title="Sentiment (FastAPI + transformers pipeline)")


class TextInput(BaseModel):
    text: str


class Sentiment(BaseModel):
    label: str
    score: float


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(payload: TextInput) -> Sentiment:
    (result,) = classifier(payload.text, truncation=True, max_length=MAX_LENGTH)
    return Sentiment(label=result["label"], score=result["score"])
