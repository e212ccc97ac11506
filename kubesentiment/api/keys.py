"""API keys: which client is calling, known by a name that logs and metrics can show.

Only SHA-256 digests of the keys stay in memory, so a heap dump or a debugger does not hand out
working keys. Keys are long random strings, so a fast hash is enough (unlike passwords).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

KEY_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MIN_KEY_LENGTH = 16


class InvalidKeys(ValueError):
    """A key list that must not be used; the message names the entry, never a key."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys(text: str) -> dict[str, str]:
    """`name:key,name:key` (the API_KEYS setting) as a mapping of name to key."""
    keys: dict[str, str] = {}
    for number, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
        name, colon, key = entry.partition(":")
        if not colon:
            raise InvalidKeys(f"API_KEYS entry {number} is not name:key")
        keys[name.strip()] = key.strip()
    return keys


class KeyRing:
    """The keys valid now. Several at once make rotation possible: add the new key, move the
    clients over, remove the old one. `replace` swaps the whole set, so a request sees either
    the old set or the new one."""

    def __init__(self, keys: Mapping[str, str] | None = None) -> None:
        self._digests: tuple[tuple[str, bytes], ...] = ()
        self.replace(keys or {})

    def replace(self, keys: Mapping[str, str]) -> None:
        for name, key in keys.items():
            if not name or not set(name) <= KEY_NAME_CHARS:
                raise InvalidKeys(f"API key name {name!r}: use letters, digits, '-', '_', '.'")
            if len(key) < MIN_KEY_LENGTH:
                raise InvalidKeys(f"API key {name!r} is shorter than {MIN_KEY_LENGTH} characters")
        self._digests = tuple((name, _digest(key)) for name, key in sorted(keys.items()))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def identify(self, presented: str) -> str | None:
        """The name of the key presented, or None. Every known key is compared, in constant time
        each, so the answer time does not tell how much of a key was right or which one."""
        digest = _digest(presented)
        found = None
        for name, known in self._digests:
            if hmac.compare_digest(digest, known):
                found = name
        return found
