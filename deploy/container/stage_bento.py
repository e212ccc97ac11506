"""Stage a Bento of the store as a build context for deploy/container/Containerfile: its files
with its models copied in under `models/` (the store's Bento only names them; this is what
`bentoml containerize` and `bentoml export` do too), readable by everyone and writable by no
one but the owner. Prints the Bento's version (progress goes to stderr).

Usage: python deploy/container/stage_bento.py kubesentiment:latest DEST
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from pathlib import Path


def stage(tag: str, dest: Path) -> str:
    import bentoml
    from _bentoml_sdk.models import BentoModel

    bento = bentoml.get(tag)
    shutil.copytree(bento.path, dest)
    for model in bento.info.all_models:
        if model.registry == "bentoml":
            print(f"==> model {model.tag}", file=sys.stderr, flush=True)
            BentoModel(model.tag).resolve(dest / "models")
    # The image's user (UID 1034) reads the Bento; nobody but root writes it.
    for path in [dest, *dest.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        readable = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
        if path.is_dir() or mode & stat.S_IXUSR:
            readable |= stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH
        path.chmod((mode | readable) & ~(stat.S_IWGRP | stat.S_IWOTH))
    return str(bento.tag.version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tag", help="a Bento in the store, e.g. kubesentiment:latest")
    parser.add_argument("dest", type=Path, help="a folder that does not exist yet")
    args = parser.parse_args()
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    print(stage(args.tag, args.dest))


if __name__ == "__main__":
    main()
