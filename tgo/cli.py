"""`tgo` on the command line (also `python -m tgo`): thin, every option mirrors an MLflow parameter.

    tgo train --preset demo --epochs 5
    tgo train --resume <run_id>
    tgo data imagenet100 --src /data/imagenet --dst /data/imagenet100

Exit status: 0 on success, 2 for bad parameters or data (nothing was logged), 1 when a run failed.
"""

from __future__ import annotations

import argparse
import json
import sys

from tgo import config as C


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a ViT with per-epoch geometry, tracked in MLflow",
        description="Train a timm ViT and measure its spectral geometry at every epoch (0 = initialisation). "
        "Every option defaults to the preset's value; the resolved config is logged to the run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = C.TrainConfig()
    for name in C.FIELD_TYPES:
        preset_value = getattr(defaults, name)
        p.add_argument(
            f"--{name}",
            dest=name,
            default="demo" if name == "preset" else "",
            metavar=type(preset_value).__name__.upper(),
            help=C.HELP[name] + ("" if name == "preset" else f" [demo preset: {preset_value!r}]"),
        )


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets", description="Prepare datasets for tgo.")
    what = p.add_subparsers(dest="what", required=True)
    inet = what.add_parser(
        "imagenet100",
        help="build ImageNet-100 as symlinks from an ImageNet-1k class-folder tree",
        description="Make DST/{train,val}/<wnid>/ symlinks for the 100 classes of ImageNet-100 "
        "(tgo/data/imagenet100_classes.txt) from SRC/{train,val}/<wnid>/, and report what is missing.",
    )
    inet.add_argument("--src", required=True, help="ImageNet-1k root holding train/ and val/ class folders")
    inet.add_argument("--dst", required=True, help="where to create ImageNet-100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgo", description="Transformer Geometry Observatory: the spectral geometry of a ViT while it trains, in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,data}")
    _train_parser(sub)
    _data_parser(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"tgo: error: {message}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from tgo.data import DataError
    from tgo.tracking import TrackingError
    from tgo.train import TrainingError, run

    values = {name: getattr(args, name) for name in C.FIELD_TYPES}
    try:
        result = run(**values)
    except (C.ConfigError, DataError, TrackingError) as err:
        return _fail(str(err), 2)
    except TrainingError as err:
        return _fail(str(err), 1)
    if result.run_id:
        summary = {k: round(v, 4) for k, v in result.metrics.items() if not k.startswith("geom/") or k.startswith("geom/final/cls/")}
        print(f"tgo: run {result.run_id} finished {result.epoch} epochs.")
        print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tgo.data import DataError, build_imagenet100

    try:
        report = build_imagenet100(args.src, args.dst)
    except DataError as err:
        return _fail(str(err), 2)
    for split in ("train", "val"):
        counts = report["counts"][split]
        lacking = report["source_lacks"].get(split, [])
        total = sum(counts.values())
        print(f"{split}: {total} images in {sum(1 for n in counts.values() if n)} of 100 classes "
              f"(fewest {min(counts.values())}, most {max(counts.values())} per class)")
        if lacking:
            print(f"  missing from {args.src}/{split}: {len(lacking)} classes: {', '.join(lacking)}")
    complete = not any(report["source_lacks"].values())
    print(f"ImageNet-100 at {args.dst} is {'complete' if complete else 'INCOMPLETE: training on it will stop with this list'}.")
    return 0 if complete else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "data": cmd_data}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
