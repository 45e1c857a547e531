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


def _analyze_parser(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="figures, trend statistics and a TGO-I report of a training run",
        description="Read a training run through the MLflow tracking API and write figures, tables, trend "
        "statistics and a report (HTML and Markdown) that says whether the run supports each TGO-I finding; "
        "log them as an analysis run, a child of the training run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_id", help="the training run to analyse")
    p.add_argument("--probe_size", default="0", help="re-probe the run's saved weights on this many validation images; 0 uses what the run logged")
    p.add_argument("--data_dir", default="", help="where the run's data lies now, for a re-probe (checked against its fingerprint)")
    p.add_argument("--probe_seed", default="", help="seed of the re-probe's image selection; empty: the run's own")
    p.add_argument("--sites", default="", help="comma-separated <site>/<view> pairs for the spectra and covariance figures; empty: final/cls and the middle block's patch view")
    p.add_argument("--device", default="auto", help="device of a re-probe")
    p.add_argument("--output_dir", default="", help="also keep the files here (default: a temporary folder)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgo", description="Transformer Geometry Observatory: the spectral geometry of a ViT while it trains, in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,analyze,data}")
    _train_parser(sub)
    _analyze_parser(sub)
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


def _int(name: str, text: str, allow_empty: bool = False) -> int | None:
    if allow_empty and text.strip() == "":
        return None
    try:
        value = float(text)  # MLflow's float parameters arrive as "0" or "0.0"
        if not value.is_integer():
            raise ValueError
        value = int(value)
    except ValueError:
        raise C.ConfigError(f"{name}: expected an integer >= 0, got {text!r}.") from None
    if value < 0:
        raise C.ConfigError(f"{name}: expected an integer >= 0, got {text!r}.")
    return value


def cmd_analyze(args: argparse.Namespace) -> int:
    from tgo.analysis import AnalysisError, analyze
    from tgo.data import DataError
    from tgo.tracking import TrackingError

    try:
        result = analyze(
            args.run_id,
            probe_size=_int("probe_size", args.probe_size),
            data_dir=args.data_dir,
            probe_seed=_int("probe_seed", args.probe_seed, allow_empty=True),
            sites=[s.strip() for s in args.sites.split(",") if s.strip()] or None,
            device=args.device,
            output_dir=args.output_dir or None,
        )
    except (C.ConfigError, DataError, TrackingError, AnalysisError) as err:
        return _fail(str(err), 2)
    for note in result.notes:
        print(f"tgo: {note}")
    print(f"tgo: analysed run {result.run_id} from {result.source}; {len(result.figures)} figures.")
    for f in result.findings:
        print(f"  finding {f.number}: {f.verdict.upper():<17} {f.claim}")
        print(f"      {f.evidence}")
    print(f"tgo: report {result.report_html}; analysis run {result.analysis_run_id}")
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
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tgo draws its own bars
    args = build_parser().parse_args(argv)
    return {"train": cmd_train, "analyze": cmd_analyze, "data": cmd_data}[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
