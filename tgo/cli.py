"""`tgo` on the command line (also `python -m tgo`): thin, every option mirrors an MLflow parameter.

    tgo train --preset demo --epochs 5
    tgo train --resume <run_id>
    tgo data imagenet100 --src /data/imagenet --dst /data/imagenet100
    tgo compare <run_a> <run_b>

Exit status: 0 on success, 2 for bad parameters or data (nothing was logged), 1 when a run failed
(`tgo.errors`: each error carries its status; `main` turns it into one message line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tgo import config
from tgo.errors import TgoError


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a ViT with per-epoch geometry, tracked in MLflow",
        description="Train a timm ViT and measure its spectral geometry at every epoch (0 = initialisation). "
        "Every option defaults to the preset's value; the resolved config is logged to the run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_train_options(p)


def _add_train_options(p, skip=(), only=None) -> None:
    """One option per TrainConfig field (those of `only`, if given); "" (the default) means the preset's value."""
    defaults = config.TrainConfig()
    for name in config.FIELD_TYPES:
        if name in skip or (only is not None and name not in only):
            continue
        preset_value = getattr(defaults, name)
        p.add_argument(
            f"--{name}",
            dest=name,
            default="demo" if name == "preset" else "",
            metavar=type(preset_value).__name__.upper(),
            help=config.HELP[name] + ("" if name == "preset" else f" [demo preset: {preset_value!r}]"),
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
    p.add_argument(
        "--probe_size", default="0", help="re-probe the run's saved weights on this many validation images; 0 uses what the run logged"
    )
    p.add_argument("--data_dir", default="", help="where the run's data lies now, for a re-probe (checked against its fingerprint)")
    p.add_argument("--probe_seed", default="", help="seed of the re-probe's image selection; empty: the run's own")
    p.add_argument(
        "--sites",
        default="",
        help="comma-separated <site>/<view> pairs for the spectra and covariance figures; empty: final/cls and the middle block's patch view",
    )
    p.add_argument("--device", default="auto", help="device of a re-probe")
    p.add_argument("--output_dir", default="", help="also keep the files here (default: none kept; they are the analysis run's artifacts)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables, statistics, verdicts and report only (faster)")
    p.add_argument("--figure_format", default="png", help="figure files: png, pdf or svg")


def _sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="one training run per seed under a parent run, and the spread across seeds",
        description="Train the same setting once per seed (child runs of one parent run) and log the mean, "
        "standard deviation and 95%% confidence interval across seeds of every metric to the parent. Run the "
        "same command in several processes (or machines) with the same --storage and --study_name to share the "
        "work; re-running it reuses finished seeds. Every train option passes through.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--seeds", default="0,1,2,3,4", help="seeds separated by commas")
    p.add_argument(
        "--storage",
        default="",
        help="Optuna storage: journal:PATH (processes on one machine), postgresql://... (machines), default sqlite:///optuna.db",
    )
    p.add_argument("--study_name", default="", help="name of the sweep in the storage; default sweep-<seeds>")
    p.add_argument("--figure_format", default="png", help="figure files of the aggregate: png, pdf or svg")
    _add_train_options(p)  # --seed too, as in MLproject's shared list: the sweep refuses a value


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="an Optuna study over training hyperparameters, each trial a child run with its geometry",
        description="Search hyperparameters with Optuna; every trial is a training run (a child of the study's "
        "parent run) with its full geometry. Run the same command in several processes or machines with the "
        "same --storage and --study_name to share the trials. Train options not in the search space pass through.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--n_trials", default="10", help="trials in the whole study (all workers together)")
    p.add_argument("--objectives", default="val/acc1:max", help="metric:max|min, comma-separated for several (multi-objective)")
    p.add_argument(
        "--search_space", default="", help="YAML search space; default: the one shipped in the package (tgo/data/search_space.yaml)"
    )
    p.add_argument("--storage", default="", help="Optuna storage: default sqlite:///optuna.db, journal:PATH, postgresql://...")
    p.add_argument("--study_name", default="tgo-study", help="name of the study in the storage (resumed if it exists)")
    p.add_argument("--pruner", default="median", help="median, hyperband, successive_halving or none")
    p.add_argument("--sampler_seed", default="0", help="seed of Optuna's sampler")
    p.add_argument("--figure_format", default="png", help="figure files of the study's parent run: png, pdf or svg")
    _add_train_options(p)


COMPARE_HELP = {  # MLproject's comments above the compare parameters repeat these
    "run_a": "the first training run, or a sweep parent (its seed runs)",
    "run_b": "the second training run, or a sweep parent (its seed runs)",
    "figure_format": "figure files: png, pdf or svg",
}


def _compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="which sites and observables differ between two runs (or two sweep parents), and their CKA",
        description="Read two training runs (or sweep parents) through the MLflow tracking API and test, at the "
        "epochs both probed, which sites and observables differ (jackknife standard errors for one run per side, "
        "Welch's t test across seeds for sweeps; Benjamini-Hochberg per epoch), with effect sizes, the CKA between "
        "the runs' features at each site, figures and a report; log them as a comparison run that links both.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_a", help=COMPARE_HELP["run_a"])
    p.add_argument("run_b", help=COMPARE_HELP["run_b"])
    p.add_argument(
        "--output_dir",
        default="",
        help="also keep the files here (default: none kept, they are the comparison run's artifacts; with --no-log a temporary folder)",
    )
    p.add_argument("--no-log", dest="log", action="store_false", help="write the files only; log no comparison run")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="tables, tests and report only (faster)")
    p.add_argument("--figure_format", default="png", help=COMPARE_HELP["figure_format"])


PROBE_HELP = {  # MLproject's comments above the probe's own parameters repeat these
    "checkpoints": "a checkpoint file, a glob (in quotes) or a folder: timm train.py, DeiT, Lightning .ckpt, "
    "Hugging Face Trainer checkpoint-STEP/ folders, or bare state dicts (.pt, .pth, .bin, .safetensors)",
    "run_id": "the probe run to continue (default: the run of the same source and model, else a new run)",
    "epoch": "the step of a single file without an epoch of its own (bare weights; default 0)",
    "normalize": "dataset: normalise as tgo train does on the dataset; model: the model's own data config (timm)",
    "trust_checkpoints": "let checkpoints be unpickled beyond tensors (runs code in them: only files you trust)",
    "follow": "keep watching the source and probe each new checkpoint as another process writes it",
    "follow_until": "with follow: stop once the checkpoint of this step is probed (empty: no such step)",
    "follow_timeout": "with follow: stop after this many seconds without a new checkpoint",
}


def _probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="the geometry of checkpoints trained anywhere (timm, DeiT, Lightning, Hugging Face), as a tgo run",
        description="Probe every checkpoint under a file, glob or folder with tgo's probe and record them as one run "
        "(tag tgo.kind=probe) with a training run's geometry keys and artifacts, at the step of each checkpoint's own "
        "epoch (training epochs completed; 0 = the initialisation). Run it again to probe only new checkpoints; "
        "--follow watches a training in progress. The model, data and probe options are tgo train's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoints", required=True, help=PROBE_HELP["checkpoints"])
    p.add_argument("--run_id", default="", help=PROBE_HELP["run_id"])
    p.add_argument("--epoch", default="", help=PROBE_HELP["epoch"])
    p.add_argument("--normalize", default="dataset", help=PROBE_HELP["normalize"])
    p.add_argument("--trust_checkpoints", default="false", help=PROBE_HELP["trust_checkpoints"])
    p.add_argument("--follow", default="false", help=PROBE_HELP["follow"])
    p.add_argument("--follow_until", default="", help=PROBE_HELP["follow_until"])
    p.add_argument("--follow_timeout", default="600", help=PROBE_HELP["follow_timeout"])
    _add_train_options(p, only=config.PROBE_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    import tgo

    parser = argparse.ArgumentParser(
        prog="tgo", description="Transformer Geometry Observatory: the spectral geometry of a ViT while it trains, in MLflow."
    )
    parser.add_argument("--version", action="version", version=f"tgo {tgo.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,probe,analyze,sweep,study,data,compare}")
    _train_parser(sub)
    _probe_parser(sub)
    _analyze_parser(sub)
    _sweep_parser(sub)
    _study_parser(sub)
    _data_parser(sub)
    _compare_parser(sub)
    return parser


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is at the time (flushed at every line)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the property wins
        pass


def _log_to_stdout() -> None:
    """What tgo's modules log (logger "tgo"), as "tgo: <message>" lines on stdout, once per process."""
    logger = logging.getLogger("tgo")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("tgo: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fail(message: str, code: int) -> int:
    print(f"tgo: error: {message}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    from tgo.train import run

    result = run(**_train_values(args))
    if result.run_id:
        from tgo.keys import parse_metric_key

        summary = {
            k: round(v, 4)
            for k, v in result.metrics.items()
            if (parts := parse_metric_key(k)) is None or (parts.site, parts.view) == result.head
        }
        if result.stopped_by:
            print(f"tgo: run {result.run_id} stopped by alarm {result.stopped_by} at epoch {result.epoch} of {result.config.epochs}.")
        else:
            print(f"tgo: run {result.run_id} finished {result.epoch} epochs.")
        print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


# The ranges of the integer options of analyze, probe and study (the train options' are config.INT_RANGES).
OPTION_RANGES: dict[str, tuple[int, int, str]] = {
    "probe_size": (0, config.INT_RANGES["probe_size"][1], " (0: what the run logged)"),
    "probe_seed": config.INT_RANGES["probe_seed"],
    "epoch": (0, 2**63 - 1, " (a step of the run: MLflow's 64-bit steps)"),
    "follow_until": (0, 2**63 - 1, " (a step of the run: MLflow's 64-bit steps)"),
    "n_trials": (0, 1_000_000, ""),
    "sampler_seed": (0, config.SEED_MAX, " (numpy's seed range)"),
}


def _int(name: str, text: str, allow_empty: bool = False) -> int | None:
    """An integer option of analyze, probe and study, within its range (OPTION_RANGES)."""
    if allow_empty and text.strip() == "":
        return None
    return config.parse_int(name, text, *OPTION_RANGES[name])


def cmd_analyze(args: argparse.Namespace) -> int:
    from tgo.analysis import analyze

    result = analyze(
        args.run_id,
        probe_size=_int("probe_size", args.probe_size) or 0,
        data_dir=args.data_dir,
        probe_seed=_int("probe_seed", args.probe_seed, allow_empty=True),
        sites=[s.strip() for s in args.sites.split(",") if s.strip()] or None,
        device=args.device,
        output_dir=args.output_dir or None,
        figures=args.figures,
        figure_format=args.figure_format,
    )
    for note in result.notes:
        print(f"tgo: {note}")
    print(f"tgo: analysed run {result.run_id} from {result.source}; {len(result.figures)} figures.")
    for f in result.findings:
        print(f"  finding {f.number}: {f.verdict.upper():<17} {f.claim}")
        print(f"      {f.evidence}")
    print(f"tgo: accuracy: {result.accuracy_summary}")
    print(f"tgo: report {_where(result.report_html, result.output_dir, 'analysis', result.analysis_run_id)}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from tgo.series import probe_checkpoints

    result = probe_checkpoints(
        args.checkpoints,
        run_id=args.run_id,
        epoch=_int("epoch", args.epoch, allow_empty=True),
        normalize=args.normalize,
        trust_checkpoints=config.parse_bool("trust_checkpoints", args.trust_checkpoints),
        follow=config.parse_bool("follow", args.follow),
        follow_until=_int("follow_until", args.follow_until, allow_empty=True),
        follow_timeout=config.parse_float("follow_timeout", args.follow_timeout),
        **_train_values(args),
    )
    done = f"probed steps {result.probed}" if result.probed else "probed nothing new"
    skipped = f"; steps {result.skipped} were already in the run" if result.skipped else ""
    if result.stopped_by:
        left = sorted({c.step for c in result.series.checkpoints} - set(result.probed) - set(result.skipped))
        rest = f", steps {left} not probed" if left else ""
        skipped += f"; stopped at step {result.stopped_at} by alarm {result.stopped_by} (alarm_action=stop){rest}"
    print(f"tgo: run {result.run_id}: {done}{skipped} ({len(result.series.checkpoints)} checkpoints under {args.checkpoints}).")
    return 0


def _train_values(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in config.FIELD_TYPES if hasattr(args, name)}


def cmd_sweep(args: argparse.Namespace) -> int:
    from tgo.sweep import sweep

    result = sweep(args.seeds, storage=args.storage, study_name=args.study_name, figure_format=args.figure_format, **_train_values(args))
    for note in result.notes:
        print(f"tgo: {note}")
    print(f"tgo: sweep {result.study_name}: {len(result.seed_runs)} seeds complete; parent run {result.parent_run_id}.")
    if result.findings is not None:
        print(result.findings.to_string(index=False))
    return 1 if result.failed else 0


def cmd_study(args: argparse.Namespace) -> int:
    from tgo.study import DEFAULT_SPACE, study

    result = study(
        _int("n_trials", args.n_trials) or 0,
        objectives=args.objectives,
        search_space=args.search_space or DEFAULT_SPACE,
        storage=args.storage,
        study_name=args.study_name,
        pruner=args.pruner,
        sampler_seed=_int("sampler_seed", args.sampler_seed) or 0,
        figure_format=args.figure_format,
        **_train_values(args),
    )
    for note in result.notes:
        print(f"tgo: {note}")
    print(f"tgo: study {result.study_name}: {len(result.trials)} trials; best {result.best_trials}; parent run {result.parent_run_id}.")
    print(result.trials.to_string(index=False))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from tgo.data import build_imagenet100

    report = build_imagenet100(args.src, args.dst)
    for split in ("train", "val"):
        counts = report["counts"][split]
        lacking = report["source_lacks"].get(split, [])
        total = sum(counts.values())
        print(
            f"{split}: {total} images in {sum(1 for n in counts.values() if n)} of 100 classes "
            f"(fewest {min(counts.values())}, most {max(counts.values())} per class)"
        )
        if lacking:
            print(f"  missing from {args.src}/{split}: {len(lacking)} classes: {', '.join(lacking)}")
    if report.get("replaced_links"):
        print(f"  {report['replaced_links']} dangling links in {args.dst} (to images no longer there) were made again.")
    complete = not any(report["source_lacks"].values())
    print(f"ImageNet-100 at {args.dst} is {'complete' if complete else 'INCOMPLETE: training on it will stop with this list'}.")
    return 0 if complete else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from tgo.compare import compare

    result = compare(
        args.run_a, args.run_b, output_dir=args.output_dir or None, log=args.log, figures=args.figures, figure_format=args.figure_format
    )
    for note in result.notes:
        print(f"tgo: {note}")
    tested = int(((result.differences.epoch == result.last_epoch) & result.differences.p.notna()).sum())
    print(
        f"tgo: compared {args.run_a} (A) with {args.run_b} (B) at {len(result.epochs)} matched epochs ({result.method}); "
        f"at epoch {result.last_epoch}, {len(result.differing)} of {tested} site/view/observable tests differ."
    )
    for row in result.differing.head(10).itertuples():
        print(f"  {row.site}/{row.view} {row.observable}: {row.a:.4g} -> {row.b:.4g} (difference {row.difference:+.4g}, q {row.q:.2g})")
    if len(result.cka):
        last = result.cka[result.cka.epoch == result.cka.epoch.max()]
        print(
            f"tgo: CKA between the runs at epoch {int(last.epoch.iloc[0])}: "
            + ", ".join(f"{r.site}/{r.view} {r.cka:.3f}" for r in last.itertuples())
        )
    print(f"tgo: report {_where(result.report_html, result.output_dir, 'comparison', result.comparison_run_id)}")
    return 0


def _where(report, folder, kind: str, run_id: str) -> str:
    """Where the report is: the folder kept (--output_dir, or a temporary one when nothing was
    logged), or else only the artifact of the run it was logged to (the temporary folder is gone)."""
    if folder is None:
        return f"{report} in {kind} run {run_id} (its artifacts; --output_dir DIR also keeps the files)"
    return f"{report}; {kind} run {run_id}" if run_id else f"{report} (not logged)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stdout()
    # MLflow's SQL store logs every database error it raises with a full traceback; tgo reports the
    # error it catches in one message (a store turned read-only, say), so the duplicate is muted.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # MLflow draws a progress bar per artifact transfer, which would interleave with tgo's own; the
    # command line (this process is tgo's) switches them off unless the user has set them.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    commands = {
        "train": cmd_train,
        "probe": cmd_probe,
        "analyze": cmd_analyze,
        "sweep": cmd_sweep,
        "study": cmd_study,
        "data": cmd_data,
        "compare": cmd_compare,
    }
    try:
        return commands[args.command](args)
    except TgoError as err:  # every error tgo raises for bad input or an unusable service: one line and its status
        return _fail(str(err), err.exit_code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
