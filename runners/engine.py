"""The one pre/post-processing path every back end shares: tokenise, cut long texts into
overlapping windows (windowing.py), group windows of similar length into batches, score, and
fold window scores back into one answer per text.

Both the HTTP service, the runner services and the Kafka worker call `SentimentEngine.predict`,
so a text gets the same score whichever door it came through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
from tokenizers import Encoding

from kubesentiment.settings import BackendName
from runners.model_store import StoredModel
from runners.prediction import Prediction
from runners.windowing import Windowing


class Backend(Protocol):
    """Anything that turns a padded batch of token ids into logits."""

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class OnnxBackend:
    def __init__(self, model_file: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT threads spin by default, stealing the core that serves HTTP between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        return np.asarray(logits)


class TorchBackend:
    def __init__(self, hf_dir: Path, threads: int) -> None:
        import torch

        from runners.architecture import load_classifier

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = load_classifier(hf_dir).eval()

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            out = self.model(
                input_ids=self.torch.from_numpy(input_ids),
                attention_mask=self.torch.from_numpy(attention_mask),
            ).logits
        return out.numpy()


BatchObserver = Callable[[int, int], None]
"""Called once per inference batch with (rows, tokens), for metrics."""

WindowAggregation = Literal["probability_mean", "logit_mean", "confidence_weighted"]
"""How a long text's window scores fold into one answer, each window weighted by its tokens:
the mean of the probabilities; the mean of the log-probabilities (a confident window counts
more); or the mean of the probabilities weighted again by each window's confidence. The
pipeline measures all three on whole validation reviews and records the best in the model's
metadata (docs/model.md)."""
WINDOW_AGGREGATIONS: tuple[WindowAggregation, ...] = get_args(WindowAggregation)


def fold_windows(
    window_probs: np.ndarray,
    owners: Sequence[int],
    tokens: np.ndarray,
    texts: int,
    how: WindowAggregation = "probability_mean",
) -> np.ndarray:
    """Class probabilities per text from the probabilities of its windows."""
    weights = tokens.astype(np.float32)
    values = window_probs
    if how == "logit_mean":
        values = np.log(np.clip(window_probs, 1e-7, 1.0))
    elif how == "confidence_weighted":
        classes = window_probs.shape[1]
        confidence = (window_probs.max(axis=1) - 1 / classes) * classes / (classes - 1)
        weights = weights * (confidence + 1e-3)
    totals = np.zeros((texts, window_probs.shape[1]), dtype=np.float32)
    np.add.at(totals, owners, values * weights[:, None])
    totals /= np.bincount(owners, weights=weights, minlength=texts)[:, None]
    if how == "logit_mean":
        totals = np.exp(totals - totals.max(axis=1, keepdims=True))
    return totals / totals.sum(axis=1, keepdims=True)


class SentimentEngine:
    def __init__(
        self,
        windowing: Windowing,
        backend: Backend,
        labels: Sequence[str],
        max_batch_size: int = 64,
        observe_batch: BatchObserver | None = None,
        window_aggregation: WindowAggregation = "probability_mean",
    ) -> None:
        self.windowing = windowing
        self.pad_id = windowing.pad_id
        self.backend = backend
        self.labels = list(labels)
        self.max_batch_size = max_batch_size
        self.observe_batch = observe_batch
        self.window_aggregation = window_aggregation

    def windows(self, texts: Sequence[str]) -> tuple[list[Encoding], list[int]]:
        return self.windowing.windows(texts)

    def batches(
        self, windows: Sequence[Encoding]
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The model's inputs in batches of similar length: for each, the windows' indices,
        input_ids padded with the tokenizer's pad id, and the attention mask."""
        lengths = np.array([len(w.ids) for w in windows])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.max_batch_size):
            idx = order[start : start + self.max_batch_size]
            width = int(lengths[idx].max())
            input_ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
            attention_mask = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                ids = windows[i].ids
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
            yield idx, input_ids, attention_mask

    def probabilities(self, windows: Sequence[Encoding]) -> np.ndarray:
        """Class probabilities per window, scored in batches of similar length."""
        probs = np.empty((len(windows), len(self.labels)), dtype=np.float32)
        for idx, input_ids, attention_mask in self.batches(windows):
            logits = self.backend.logits(input_ids, attention_mask).astype(np.float32)
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs[idx] = shifted / shifted.sum(axis=1, keepdims=True)
            if self.observe_batch is not None:
                self.observe_batch(len(idx), int(attention_mask.sum()))
        return probs

    def predict(self, texts: Sequence[str]) -> list[Prediction]:
        if not texts:
            return []
        windows, owners = self.windows(texts)
        lengths = [len(window.ids) for window in windows]
        return self.fold(self.probabilities(windows), lengths, owners, len(texts))

    def fold(
        self,
        window_probs: np.ndarray,
        lengths: Sequence[int],
        owners: Sequence[int],
        texts: int,
    ) -> list[Prediction]:
        """One prediction per text from the probabilities of its windows (each weighted by its
        length in tokens), which may have been scored in several calls (the entry service's
        scheduler splits long work)."""
        tokens = np.asarray(lengths)
        totals = fold_windows(window_probs, owners, tokens, texts, self.window_aggregation)
        best = totals.argmax(axis=1)
        return [Prediction(self.labels[int(b)], float(totals[i, b])) for i, b in enumerate(best)]


def load_engine(
    model: StoredModel,
    backend: BackendName,
    threads: int,
    max_batch_size: int = 64,
    observe_batch: BatchObserver | None = None,
    onnx_file: Path | None = None,
) -> SentimentEngine:
    """The engine for one stored model and one back end, configured from its metadata;
    `onnx_file` swaps in another graph of the same model (benchmarks of int8 layouts)."""
    scorer: Backend
    if backend == "pytorch":
        scorer = TorchBackend(model.pytorch_dir, threads)
    else:
        graph = onnx_file or model.onnx_file(quantized=backend == "onnx-int8")
        scorer = OnnxBackend(graph, threads)
    return SentimentEngine(
        Windowing.of(model),
        scorer,
        labels=model.metadata["labels"],
        max_batch_size=max_batch_size,
        observe_batch=observe_batch,
        window_aggregation=model.metadata.get("window_aggregation", "probability_mean"),
    )
