"""`python -m models`: the model pipeline from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

from kubesentiment.settings import get_settings, use_local_models_only
from models import RECIPE_OF_NAME, TRANSFER_SOURCES


def _parser() -> argparse.ArgumentParser:
    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="python -m models", description="KubeSentiment model pipeline."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=settings.data_dir,
        help="cache of the downloaded data (env DATA_DIR)",
    )
    parser.add_argument(
        "--name",
        default=settings.model_name,
        help="model name in the BentoML store (env MODEL_NAME)",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only about N rated sentences, shared by the domains (smoke runs)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("data", help="download the rated sentences and print the split")

    build = sub.add_parser(
        "build",
        help="train, export, quantise, evaluate and register the default model; "
        "skipped when the store already holds it (what `make model` runs)",
    )
    # Defaults are TrainConfig's, filled in after parsing: importing it here would import
    # transformers before main() decides whether the hub may be used.
    build.add_argument("--epochs", type=int, help="default: the recipe's")
    build.add_argument("--learning-rate", type=float, help="default: the recipe's")
    build.add_argument("--batch-size", type=int, help="default: the recipe's")
    build.add_argument(
        "--recipe",
        choices=("default", "full", "fast", "large", "distilled"),
        default="default",
        help="default: all-MiniLM-L6-v2 (`make model`), full where the CPU has native bf16, "
        "else fast (1.3 epochs, word embeddings frozen); large: all-mpnet-base-v2 "
        "(`make model-large`, about half an hour on 2 cores); distilled: all-MiniLM-L6-v2 "
        "taught by sentiment-large (built first if missing)",
    )
    build.add_argument("--teacher", help="distilled: the teacher's name in the store")
    build.add_argument(
        "--distill-weight", type=float, help="distilled: the teacher's share of the loss (0-1)"
    )
    build.add_argument("--temperature", type=float, help="distilled: softens the teacher's term")
    build.add_argument(
        "--transfer",
        nargs="*",
        choices=TRANSFER_SOURCES,
        help="distilled: the transfer set's sources (none: the training texts only)",
    )
    build.add_argument("--seed", type=int, help="training seed (the split stays the same)")
    build.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    build.add_argument("--force", action="store_true", help="build even if the store has it")

    sub.add_parser(
        "prepare",
        help=f"what `make run` runs: build the model MODEL_NAME names if it is ours "
        f"({', '.join(RECIPE_OF_NAME)}), else check that the store holds it (and only "
        f"check where MODEL_TAG pins a version)",
    )

    imp = sub.add_parser("import", help="export, evaluate and register a model you bring")
    imp.add_argument("source", help="a local Hugging Face folder, or a hub id")

    evaluate = sub.add_parser(
        "evaluate", help="metrics per domain and back end of a stored model, on the test splits"
    )
    evaluate.add_argument("tag", nargs="?", default=None, help="name:version (default: latest)")
    evaluate.add_argument(
        "--json", action="store_true", help="every figure as JSON instead of the table"
    )
    return parser


def _distillation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    chosen = {
        "teacher": args.teacher,
        "weight": args.distill_weight,
        "temperature": args.temperature,
        "transfer": tuple(args.transfer) if args.transfer is not None else None,
    }
    if args.distill_weight is not None and not 0 <= args.distill_weight <= 1:
        raise ValueError("--distill-weight must be between 0 and 1")
    if args.temperature is not None and args.temperature <= 0:
        raise ValueError("--temperature must be positive")
    return {k: v for k, v in chosen.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "import" or Path(args.source).exists():
        use_local_models_only()  # only `import <hub id>` needs the hub
    from models import data, pipeline
    from models.train import RECIPES
    from runners import model_store

    try:
        if args.command == "data":
            splits = data.load_splits(args.data_dir, limit=args.limit)
            print(json.dumps(splits.sizes() | {"fingerprint": splits.fingerprint()}))
        elif args.command == "build":
            chosen = {
                "epochs": args.epochs,
                "learning_rate": args.learning_rate,
                "batch_size": args.batch_size,
            }
            if any(value is not None and value <= 0 for value in chosen.values()):
                raise ValueError("--epochs, --batch-size and --learning-rate must be positive")
            overrides: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
            if args.seed is not None:
                overrides["seed"] = args.seed
            if args.max_steps is not None:
                overrides["max_steps"] = args.max_steps
            config = replace(RECIPES[args.recipe], **overrides)
            if distilling := _distillation_overrides(args):
                if config.distillation is None:
                    raise ValueError(f"{', '.join(distilling)} need --recipe distilled")
                config = replace(config, distillation=replace(config.distillation, **distilling))
            stored = pipeline.build(args.name, args.data_dir, config, args.limit, args.force)
            print(stored.tag)
        elif args.command == "prepare":
            pinned = get_settings().model_tag
            if pinned != "latest":  # a pinned version is served as it is, never rebuilt
                try:
                    stored = model_store.get(f"{args.name}:{pinned}")
                except LookupError as err:
                    raise LookupError(
                        f"MODEL_TAG pins {args.name}:{pinned}, which is not in the BentoML "
                        f"store; a pinned version is never rebuilt: import or copy it into "
                        f"the store, or unset MODEL_TAG to serve the newest {args.name}"
                    ) from err
            elif args.name in RECIPE_OF_NAME:
                recipe = RECIPES[RECIPE_OF_NAME[args.name]]
                stored = pipeline.build(args.name, args.data_dir, recipe, args.limit)
            else:
                try:
                    stored = model_store.get(args.name)
                except LookupError as err:
                    raise LookupError(
                        f"model {args.name!r} is not in the BentoML store and no recipe of "
                        f"ours makes it: import it (`python -m models --name {args.name} "
                        f"import FOLDER`) or set MODEL_NAME to one of "
                        f"{', '.join(RECIPE_OF_NAME)}"
                    ) from err
            print(stored.tag)
        elif args.command == "import":
            stored = pipeline.import_model(args.source, args.name, args.data_dir, args.limit)
            print(stored.tag)
        elif args.command == "evaluate":
            from models.evaluate import evaluate, metrics_table

            stored = model_store.get(args.tag or args.name)
            splits = data.load_splits(args.data_dir, limit=args.limit)
            metrics = evaluate(stored, splits.test)
            print(json.dumps(metrics, indent=2) if args.json else metrics_table(metrics))
    except (pipeline.ModelSourceError, LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
