"""The ONNX model as a user of MLServer or Ray Serve would run it: the stored tokenizer.json,
truncation at the model's max_length, padding to the longest text of each batch, one ONNX
Runtime session, softmax over the logits. Shared by mlserver_runtime.py and ray_app.py; it runs
in their virtual environments (onnxruntime, tokenizers, numpy), never in the project's.

Unlike our service it neither normalises text nor scores long texts in overlapping windows:
what does not fit in max_length tokens is cut, as a plain `enable_truncation` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer


class OnnxClassifier:
    def __init__(
        self,
        model_file: Path,
        tokenizer_file: Path,
        labels: Sequence[str],
        max_length: int,
        threads: int,
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length=max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")
        self.labels = list(labels)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # The same session settings as our service: idle ORT threads spin by default, taking
        # CPU from the process that serves HTTP between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )

    def predict(self, texts: Sequence[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text, all texts in one batch."""
        encodings = self.tokenizer.encode_batch(list(texts))
        input_ids = np.array([e.ids for e in encodings], dtype=np.int64)
        attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (logits,) = self.session.run(
            ["logits"], {"input_ids": input_ids, "attention_mask": attention_mask}
        )
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [(self.labels[int(b)], float(probs[i, b])) for i, b in enumerate(best)]
