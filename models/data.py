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
MOVIES = "movieReviewSnippets"
EXTRA_SETS = ("tweets", "amazonReviewSnippets", "nytEditorialSnippets")
# Auxiliary sentences rated this close to neutral carry more noise than signal.
EXTRA_MIN_ABS_RATING = 0.5


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = POSITIVE, the sign of the mean human rating
    soft: float  # share of raters who leaned positive: a soft target for training
    rating: float  # mean human rating on -4..+4


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
                digest.update(f"{name}\t{ex.label}\t{ex.soft:.4f}\t{ex.text}\n".encode())
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


def _parse_ratings(text: str) -> dict[str, float]:
    """Per sentence id, the share of raters who leaned positive (a tie counts half)."""
    shares = {}
    for line in text.splitlines():
        parts = line.lstrip("\ufeff").split("\t")
        if len(parts) < 4:
            continue
        votes = [int(v) for v in parts[3].strip("[] ").split(",") if v.strip()]
        positive = sum(v > 0 for v in votes) + 0.5 * sum(v == 0 for v in votes)
        shares[parts[0]] = positive / len(votes)
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
        examples.append(
            Example(parts[2].strip(), int(mean > 0), shares.get(parts[0], float(mean > 0)), mean)
        )
    return examples


def read_sets(sdist: Path) -> dict[str, list[Example]]:
    with tarfile.open(sdist) as outer:
        member = outer.extractfile(INNER_ARCHIVE)
        if member is None:
            raise RuntimeError(f"{sdist} lacks {INNER_ARCHIVE}")
        inner_bytes = member.read()
    sets = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:

        def read(name: str) -> str:
            file = inner.extractfile(f"hutto_ICWSM_2014/{name}")
            assert file is not None
            return file.read().decode("utf-8", errors="replace")

        for name in (MOVIES, *EXTRA_SETS):
            sets[name] = _parse_set(
                read(f"{name}_GroundTruth.txt"), read(f"{name}_anonDataRatings.txt")
            )
    return sets


def split_sets(
    sets: dict[str, list[Example]], seed: int = 13, use_extra: bool = True, limit: int | None = None
) -> Splits:
    """80/10/10 split of the movie sentences; the other rated sets only ever add training data,
    so validation and test stay pure movie reviews."""
    movies = list(dict.fromkeys(sets[MOVIES]))  # drop exact duplicates, keep order
    random.Random(seed).shuffle(movies)
    if limit is not None:
        movies = movies[:limit]
    n_val = n_test = len(movies) // 10
    test, validation = movies[:n_test], movies[n_test : n_test + n_val]
    held_out = {ex.text for ex in test + validation}
    train = movies[n_test + n_val :]
    if use_extra and limit is None:
        for name in EXTRA_SETS:
            train += [
                ex
                for ex in sets[name]
                if ex.text not in held_out and abs(ex.rating) >= EXTRA_MIN_ABS_RATING
            ]
    random.Random(seed + 1).shuffle(train)
    return Splits(train=train, validation=validation, test=test)


def load_splits(
    data_dir: Path, seed: int = 13, use_extra: bool = True, limit: int | None = None
) -> Splits:
    return split_sets(read_sets(fetch_sdist(data_dir)), seed=seed, use_extra=use_extra, limit=limit)
