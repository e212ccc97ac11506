"""Labelled English sentiment data in four domains, fetched at set-up time.

The human-rated sentences of Hutto & Gilbert (ICWSM 2014) ship inside the source distribution of
vaderSentiment 3.3.2 (MIT). We download that sdist from the package index, check its hash and
read the ratings from it: no third-party text is ever committed to this repository.

Every domain is split on its own, with a fixed seed, so each has a test split that training
and model selection never see. Amazon sentences are split by review, so that no sentence of a
held-out review is trained on, and the held-out reviews are also rebuilt whole: that is the
test of how long texts are scored.
"""

from __future__ import annotations

import hashlib
import io
import random
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.downloads import fetch_verified

SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
# Domain name -> file prefix in the archive. Whole Amazon reviews are a fifth, derived domain.
DOMAIN_FILES = {
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "movies": "movieReviewSnippets",
}
WHOLE_REVIEWS = "amazon_reviews"
DOMAINS = (*DOMAIN_FILES, WHOLE_REVIEWS)
RATING_SCALE = tuple(range(-4, 5))  # each rater scored a sentence from -4 to +4


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = POSITIVE, the sign of the mean human rating
    rating_shares: tuple[float, ...]  # share of the raters who gave each score on RATING_SCALE
    source: str = ""  # the archive's sentence id; Amazon's "12_3" is sentence 3 of review 12
    domain: str = ""  # one of DOMAINS (not in the fingerprint: it adds nothing the split lacks)

    @property
    def soft(self) -> float:
        """The share of raters who leaned positive (a neutral 0 counts half): a soft target."""
        neutral = RATING_SCALE.index(0)
        return sum(self.rating_shares[neutral + 1 :]) + 0.5 * self.rating_shares[neutral]

    @property
    def mean_rating(self) -> float:
        return float(np.dot(RATING_SCALE, self.rating_shares))


@dataclass(frozen=True)
class Splits:
    train: list[Example]  # every domain's training part, shuffled together
    validation: dict[str, list[Example]]  # per domain in DOMAINS; for model selection
    test: dict[str, list[Example]]  # per domain in DOMAINS; never used to train or select

    def fingerprint(self) -> str:
        """A hash of every example, so a model records exactly which data made it."""
        digest = hashlib.sha256()
        parts = [("train", self.train)]
        parts += [(f"val/{d}", part) for d, part in self.validation.items()]
        parts += [(f"test/{d}", part) for d, part in self.test.items()]
        for name, part in parts:
            for ex in part:
                shares = ",".join(f"{share:.4f}" for share in ex.rating_shares)
                digest.update(f"{name}\t{ex.label}\t{shares}\t{ex.text}\n".encode())
        return digest.hexdigest()[:16]

    def sizes(self) -> dict[str, dict[str, int]]:
        return {
            "train": {"all": len(self.train)},
            "validation": {d: len(part) for d, part in self.validation.items()},
            "test": {d: len(part) for d, part in self.test.items()},
        }


def fetch_sdist(data_dir: Path) -> Path:
    """The vaderSentiment sdist, downloaded once and verified byte for byte."""
    return fetch_verified("vaderSentiment==3.3.2", SDIST, SDIST_SHA256, data_dir, sdist=True)


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


def _parse_set(truth: str, ratings: str, domain: str) -> list[Example]:
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
        label = int(mean > 0)
        examples.append(Example(parts[2].strip(), label, shares[parts[0]], parts[0], domain))
    return examples


def read_rated_sentences(sdist: Path) -> dict[str, list[Example]]:
    """Every domain's rated sentences, in the archive's order, exact duplicates dropped."""
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

        domains = {}
        for domain, prefix in DOMAIN_FILES.items():
            examples = _parse_set(
                read(f"{prefix}_GroundTruth.txt"), read(f"{prefix}_anonDataRatings.txt"), domain
            )
            unique = {e.text: e for e in reversed(examples)}  # the first of each text wins
            domains[domain] = [e for e in examples if unique[e.text] is e]
        return domains


def review_of(example: Example) -> str:
    return example.source.split("_")[0]


def whole_reviews(sentences: list[Example]) -> list[Example]:
    """Each review's sentences joined in order, labelled by the sign of their mean rating (the
    shares are averaged, so the mean of the shares is the mean of the sentence means)."""
    by_review: dict[str, list[Example]] = {}
    for sentence in sentences:
        by_review.setdefault(review_of(sentence), []).append(sentence)
    reviews = []
    for review, parts in by_review.items():
        parts.sort(key=lambda e: int(e.source.split("_")[1]))
        shares = tuple(np.mean([e.rating_shares for e in parts], axis=0).tolist())
        review_example = Example(" ".join(e.text for e in parts), 0, shares, review, WHOLE_REVIEWS)
        if (mean := review_example.mean_rating) != 0:
            reviews.append(replace(review_example, label=int(mean > 0)))
    return reviews


def split_domains(
    domains: dict[str, list[Example]], seed: int = 13, limit: int | None = None
) -> Splits:
    """A seeded 80/10/10 split of each domain; Amazon by review (a fifth of the reviews held out
    for test, a tenth for validation). `limit` keeps about that many examples in all (smoke
    runs), shared equally by the domains."""
    rng = random.Random(seed)
    train: list[Example] = []
    validation: dict[str, list[Example]] = {}
    test: dict[str, list[Example]] = {}
    for domain, examples in domains.items():
        if domain == "amazon":
            reviews = sorted({review_of(e) for e in examples}, key=int)
            rng.shuffle(reviews)
            if limit is not None:  # ten reviews at least: two for test, one for validation
                reviews = reviews[: max(10, len(reviews) * limit // (4 * len(examples)))]
            n_test = len(reviews) // 5
            part_of = {r: 0 for r in reviews[:n_test]}
            part_of |= {r: 1 for r in reviews[n_test : n_test + n_test // 2]}
            part_of |= {r: 2 for r in reviews[n_test + n_test // 2 :]}
            parts = [[e for e in examples if part_of.get(review_of(e)) == k] for k in range(3)]
        else:
            shuffled = list(examples)
            rng.shuffle(shuffled)
            if limit is not None:
                shuffled = shuffled[: limit // 4]
            n = len(shuffled) // 10
            parts = [shuffled[:n], shuffled[n : 2 * n], shuffled[2 * n :]]
        test[domain], validation[domain], domain_train = parts
        train += domain_train
    test[WHOLE_REVIEWS] = whole_reviews(test["amazon"])
    validation[WHOLE_REVIEWS] = whole_reviews(validation["amazon"])
    rng.shuffle(train)
    return Splits(train, validation, test)


def load_splits(data_dir: Path, seed: int = 13, limit: int | None = None) -> Splits:
    return split_domains(read_rated_sentences(fetch_sdist(data_dir)), seed=seed, limit=limit)
