"""How a text becomes the model's work: normalised, tokenised, cut into windows of `max_length`
tokens that overlap by `stride`. The engine scores those windows; the service, the job loop and
the Kafka worker measure the same windows to bound what one text, one request and one model
call may cost, since characters say little about it (an emoji becomes its name: a few
characters can be dozens of tokens)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from runners.model_store import StoredModel
from runners.normalization import normalize_text

STRIDE = 32


class Windowing:
    def __init__(
        self,
        tokenizer_file: Path,
        max_length: int,
        stride: int = STRIDE,
        normalize: Callable[[str], str] | None = None,
    ) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        # The tokenizer's own pad token ([PAD] = 0 for BERT, <pad> = 1 for MPNet, whose position
        # ids skip it); the engine pads batches itself.
        padding = self.tokenizer.padding
        self.pad_id = padding["pad_id"] if padding else self.tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.no_padding()
        # Windows of max_length tokens; consecutive windows share `stride` tokens of context.
        self.tokenizer.enable_truncation(max_length=max_length, stride=stride)
        self.max_length = max_length
        self.normalize = normalize

    @classmethod
    def of(cls, model: StoredModel) -> Windowing:
        return cls(
            model.tokenizer_file,
            model.metadata["max_length"],
            # Models we train read normalised text; a model a user brings reads what it was given.
            normalize=normalize_text if model.metadata.get("normalize_text") else None,
        )

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        if self.normalize is not None:
            texts = [self.normalize(text) for text in texts]
        return self.tokenizer.encode_batch(list(texts))

    def windows(self, texts: Sequence[str]) -> tuple[list[Encoding], list[int]]:
        """Every window of every text, and for each window the index of its text."""
        windows: list[Encoding] = []
        owners: list[int] = []
        for i, encoding in enumerate(self.encode(texts)):
            for window in (encoding, *encoding.overflowing):
                windows.append(window)
                owners.append(i)
        return windows, owners

    def costs(self, texts: Sequence[str]) -> list[int]:
        """Per text, the tokens the model reads: its windows' lengths, overlaps included."""
        return [
            len(encoding.ids) + sum(len(w.ids) for w in encoding.overflowing)
            for encoding in self.encode(texts)
        ]
