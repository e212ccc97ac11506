"""The made-up review sentences that every benchmark and load test sends: about 14 tokens each,
the length the service's figures are quoted for. No data set is needed."""

from __future__ import annotations

import random

SUBJECTS = (
    "The movie",
    "This film",
    "The acting",
    "The story",
    "The soundtrack",
    "The ending",
    "The cast",
    "The sequel",
    "The script",
    "The camera work",
)
VERDICTS = (
    "was wonderful and moving",
    "was a terrible waste of time",
    "felt dull and far too long",
    "is the best thing I have seen this year",
    "left me bored and annoyed",
    "was clever, funny and surprisingly warm",
    "never quite came together",
    "kept me on the edge of my seat",
    "was lazy, loud and forgettable",
    "made the whole evening worth it",
)
ENDINGS = ("honestly", "if you ask me", "from start to finish", "in the end", "for the most part")


def short_text(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERDICTS)}, {rng.choice(ENDINGS)}."


def long_text(rng: random.Random) -> str:
    """30-50 sentences (300-600 words): the service scores it in 4-8 windows of 128 tokens."""
    return " ".join(short_text(rng) for _ in range(rng.randint(30, 50)))


def sample_texts(n: int, seed: int = 7) -> list[str]:
    """`n` short texts, the same ones for the same seed."""
    rng = random.Random(seed)
    return [short_text(rng) for _ in range(n)]
