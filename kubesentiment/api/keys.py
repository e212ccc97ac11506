"""API keys: which client is calling, known by a name that logs and metrics can show.

Only SHA-256 digests of the keys stay in memory, so a heap dump or a debugger does not hand out
working keys. Keys are long random strings, so a fast hash is enough (unlike passwords).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import structlog
from starlette.requests import HTTPConnection

log = structlog.get_logger("kubesentiment.keys")
KEY_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MIN_KEY_LENGTH = 16


KEY_NAME_STATE = "api_key"  # where the gate leaves the caller's key name in the request's state


def key_name(request: HTTPConnection) -> str | None:
    """The name of the API key that the gate let this request in with; None with auth off."""
    name: str | None = request.scope.get("state", {}).get(KEY_NAME_STATE)
    return name


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
        self._skipped: list[str] = []  # warned about once, not at every refresh from Vault
        self.replace(keys or {})

    def replace(self, keys: Mapping[str, str]) -> None:
        """Use the valid entries of `keys`; an invalid one (an odd name, a short key) is skipped
        with a warning that names it, so that one bad entry in Vault does not lock every key out.
        With no valid entry at all, InvalidKeys, and the keys in use stay."""
        valid, skipped = {}, []
        for name, key in keys.items():
            if not name or not set(name) <= KEY_NAME_CHARS:
                problem = f"API key name {name!r}: use letters, digits, '-', '_', '.'"
            elif len(key) < MIN_KEY_LENGTH:
                problem = f"API key {name!r} is shorter than {MIN_KEY_LENGTH} characters"
            else:
                valid[name] = key
                continue
            skipped.append(problem)
        if skipped != self._skipped:
            for problem in skipped:
                log.warning("API key skipped", problem=problem)
        self._skipped = skipped
        if keys and not valid:
            raise InvalidKeys("no valid API key among the entries: every one was skipped")
        self._digests = tuple((name, _digest(key)) for name, key in sorted(valid.items()))

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
