"""Labelled English sentiment data, fetched at set-up time.

The human-rated sentences of Hutto & Gilbert (ICWSM 2014) ship inside the source distribution of
vaderSentiment 3.3.2 (MIT). We download that sdist from the package index, check its hash and
read the ratings from it: no third-party text is ever committed to this repository.
"""

from __future__ import annotations

import hashlib
import io
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
# The archive also rates tweets, Amazon and NYT sentences. Training on them as well (the clearly
# non-neutral ones) doubled training time and did not raise validation accuracy (README, Model).
MOVIES = "movieReviewSnippets"
RATING_SCALE = tuple(range(-4, 5))  # each rater scored a sentence from -4 to +4


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = POSITIVE, the sign of the mean human rating
    rating_shares: tuple[float, ...]  # share of the raters who gave each score on RATING_SCALE

    @property
    def soft(self) -> float:
        """The share of raters who leaned positive (a neutral 0 counts half): a soft target."""
        neutral = RATING_SCALE.index(0)
        return sum(self.rating_shares[neutral + 1 :]) + 0.5 * self.rating_shares[neutral]


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    def fingerprint(self) -> str:
        """A hash of every example, so a model records exactly which data made it."""
        digest = hashlib.sha256()
        for name, part in (("train", self.train), ("val", self.validation), ("test", self.test)):
            for ex in part:
                shares = ",".join(f"{share:.4f}" for share in ex.rating_shares)
                digest.update(f"{name}\t{ex.label}\t{shares}\t{ex.text}\n".encode())
        return digest.hexdigest()[:16]


def fetch_sdist(data_dir: Path) -> Path:
    """Download the vaderSentiment sdist once and verify it byte for byte."""
    target = data_dir / SDIST
    if not target.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading training data", package="vaderSentiment==3.3.2")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                str(data_dir),
                "vaderSentiment==3.3.2",
            ],
            check=True,
        )
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    if actual != SDIST_SHA256:
        target.unlink()
        raise RuntimeError(f"{target} has sha256 {actual}, expected {SDIST_SHA256}; deleted it")
    return target


def _parse_ratings(text: str) -> dict[str, tuple[float, ...]]:
    """Per sentence id, the share of its raters who gave each score on RATING_SCALE."""
    shares = {}
    for line in text.splitlines():
        parts = line.lstrip("\ufeff").split("\t")
        if len(parts) < 4:
            continue
        votes = [int(v) for v in parts[3].strip("[] ").split(",") if v.strip()]
        shares[parts[0]] = tuple(votes.count(score) / len(votes) for score in RATING_SCALE)
    return shares


def _parse_set(truth: str, ratings: str) -> list[Example]:
    shares = _parse_ratings(ratings)
    examples = []
    for line in truth.splitlines():
        parts = line.lstrip("\ufeff").split("\t")
        if len(parts) < 3 or not parts[2].strip():
            continue
        mean = float(parts[1])
        if mean == 0:
            continue  # no sign, no label
        if parts[0] not in shares:
            raise RuntimeError(f"sentence {parts[0]} has a mean rating but no individual ratings")
        examples.append(Example(parts[2].strip(), int(mean > 0), shares[parts[0]]))
    return examples


def read_movie_sentences(sdist: Path) -> list[Example]:
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(INNER_ARCHIVE)
        if member is None:
            raise RuntimeError(f"{sdist} lacks {INNER_ARCHIVE}")
        inner_bytes = member.read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:

        def read(name: str) -> str:
            file = inner.extractfile(f"hutto_ICWSM_2014/{name}")
            assert file is not None
            return file.read().decode("utf-8", errors="replace")

        return _parse_set(read(f"{MOVIES}_GroundTruth.txt"), read(f"{MOVIES}_anonDataRatings.txt"))


def split_sentences(examples: list[Example], seed: int = 13, limit: int | None = None) -> Splits:
    """A seeded 80/10/10 split of the movie sentences."""
    movies = list(dict.fromkeys(examples))  # drop exact duplicates, keep order
    random.Random(seed).shuffle(movies)
    if limit is not None:
        movies = movies[:limit]
    n_val = n_test = len(movies) // 10
    return Splits(
        train=movies[n_test + n_val :],
        validation=movies[n_test : n_test + n_val],
        test=movies[:n_test],
    )


def load_splits(data_dir: Path, seed: int = 13, limit: int | None = None) -> Splits:
    return split_sentences(read_movie_sentences(fetch_sdist(data_dir)), seed=seed, limit=limit)
