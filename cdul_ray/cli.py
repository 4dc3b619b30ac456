"""The ``cdul`` command: ``cdul label``, ``cdul evaluate`` (and the stages added beside them).

Every subcommand builds one frozen config from ``--config file.yaml`` plus flags, validates it before any cluster
work, runs one pipeline function and prints a one-screen summary. Bad input exits with status 2 and a message that
names the bad field.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from cdul_ray import config as config_mod
from cdul_ray import storage

logger = logging.getLogger("cdul_ray")

# Errors that mean "the user's input is wrong": reported in one line, exit status 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def _label(args: argparse.Namespace) -> int:
    from cdul_ray.pipeline import run_labeling

    cfg = config_mod.from_args(config_mod.LabelConfig, args)
    summary = run_labeling(cfg)
    if summary.evaluation:
        from cdul_ray.evaluate import render_table

        print(render_table(summary.evaluation))
        print()
    print(storage.redact(summary.render()))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cdul_ray import schema, storage
    from cdul_ray.evaluate import evaluate_labels, render_table

    threshold = args.threshold
    run_config = storage.join(args.output, schema.RUN_CONFIG_FILE)
    if not storage.exists(run_config, args.s3_endpoint):
        raise config_mod.ConfigError("output", f"no labeling run at {args.output} (no run_config.json there); pass "
                                               "the --output directory of a `cdul label` run")
    if threshold is None:
        threshold = storage.read_json(run_config, args.s3_endpoint)["threshold"]
    if not 0.0 <= threshold <= 1.0:
        raise config_mod.ConfigError("threshold", f"must be in [0, 1], got {threshold}")
    result = evaluate_labels(args.output, threshold=threshold, lam=args.lam, endpoint_override=args.s3_endpoint,
                             write=not args.no_write)
    print(render_table(result))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cdul_ray.demo import DemoConfig, run_demo

    run_demo(config_mod.from_args(DemoConfig, args))
    return 0


def build_parser(defaults: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdul", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("label", help="label a dataset with CDUL soft pseudo labels (CLIP global + snippet alignment)")
    config_mod.add_arguments(p, config_mod.LabelConfig)
    p.set_defaults(func=_label)

    p = sub.add_parser("evaluate", help="pseudo-label mAP table and ζ sweep from a labeling run's Parquet alone")
    p.add_argument("--output", required=True, help="output directory of a labeling run (local or s3://)")
    p.add_argument("--threshold", type=float, default=None, help="cdul ζ (default: the run's)")
    p.add_argument("--lam", type=float, default=0.0, help="λ of the initial soft label")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--no-write", action="store_true", help="print only; do not write evaluation.json/.md")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("demo", help="offline demo: synthetic multi-object benchmark, bundled CLIP, Table 1 (+ Table 2)")
    from cdul_ray.demo import DemoConfig

    config_mod.add_arguments(p, DemoConfig)
    p.set_defaults(func=_demo)

    for name, (help_text, register) in EXTRA_COMMANDS.items():
        register(sub.add_parser(name, help=help_text))
    if defaults:
        for action in sub.choices.values():
            action.set_defaults(**defaults)
    return parser


# Later stages (train, predict, demo) register here: name -> (help, function adding arguments and func).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------------------------------
# Training and batch prediction (cdul_ray.train, cdul_ray.predict; neither module imports Ray at import time).


def _job_command(module: str, config_name: str, run_name: str) -> Callable[[argparse.ArgumentParser], None]:
    """Register a job whose flags are the fields of ``module.config_name`` and whose run is ``module.run_name``
    (a function of the config returning a summary with ``render()``); the module is imported when the command is
    built, Ray only when it runs."""

    def run(args: argparse.Namespace) -> int:
        job = importlib.import_module(module)
        summary = getattr(job, run_name)(config_mod.from_args(getattr(job, config_name), args))
        print(storage.redact(summary.render()))
        return 0

    def register(parser: argparse.ArgumentParser) -> None:
        config_mod.add_arguments(parser, getattr(importlib.import_module(module), config_name))
        parser.set_defaults(func=run)

    return register


EXTRA_COMMANDS["train"] = (
    "train a classifier on the soft pseudo labels with gradient-alignment label updates (Ray Train)",
    _job_command("cdul_ray.train", "TrainConfig", "run_training"),
)
EXTRA_COMMANDS["predict"] = (
    "batch inference with a trained classifier: per-class probabilities as Parquet (Ray Data)",
    _job_command("cdul_ray.predict", "PredictConfig", "run_prediction"),
)


if __name__ == "__main__":
    sys.exit(main())
