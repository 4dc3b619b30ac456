"""The ``cdul`` command: ``cdul label``, ``cdul evaluate`` (and the stages added beside them).

Every subcommand builds one frozen config from ``--config file.yaml`` plus flags, validates it before any cluster
work, runs one pipeline function and prints a one-screen summary. Bad input exits with status 2 and a message that
names the flag (and its config field).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cdul_ray import config as config_mod
from cdul_ray import storage

logger = logging.getLogger("cdul_ray")

DESCRIPTION = ("cdul-ray: CDUL soft pseudo labels for unlabeled images with CLIP on Ray, gradient-alignment "
               "training, batch prediction. 'cdul COMMAND --help' shows the flags and examples of each command.")

# Examples shown at the end of each subcommand's --help (plain text: argparse prints them verbatim).
EXAMPLES = {
    "label": """\
examples:
  # offline, no download: the bundled small CLIP on a folder of images and a class list (one class per line)
  cdul label --format folder --dataset ./my_images --classes-file ./classes.txt --output ./out/mine \\
      --model cdul-synth-rn --pretrained synth
  # the paper's CLIP (downloaded once from the hub), a COCO split
  cdul label --dataset /data/coco --split train2014 --output ./out/coco --model RN50x64 --pretrained openai
  # local CLIP weights, S3 in and out
  cdul label --dataset s3://bucket/images --format folder --classes-file classes.txt --output s3://bucket/runs/a \\
      --model RN50 --pretrained /weights/RN50-openai.pt
  # a quick check that everything works: 8 synthetic images, bundled CLIP, CPU
  cdul label --smoke-test
""",
    "evaluate": """\
examples:
  cdul evaluate --output ./out/coco                   # Table 1 + ζ sweep at the run's ζ; rewrites evaluation.*
  cdul evaluate --output ./out/coco --threshold 0.3 --no-write
""",
    "demo": """\
examples:
  cdul demo                      # the full offline demo: Table 1, ζ sweep, report, Table 2 (~11 min on 2 idle CPUs)
  cdul demo --no-train           # labeling only: Table 1, ζ sweep and the report
  cdul demo --train-images 300 --test-images 100 --train-epochs 1     # a smaller world, faster
""",
    "train": """\
examples:
  cdul train --labels ./out/coco --dataset /data/coco --split train2014 --eval-split val2014 --output ./out/train
  # after the demo: the bundled CLIP's image trunk as a frozen backbone, on the synthetic benchmark
  cdul train --labels out/demo/labels-train --dataset data/synth --format coco --split train --eval-split test \\
      --output ./out/train-synth --backbone open_clip:cdul-synth-rn --pretrained-backbone synth --freeze-backbone \\
      --image-size 128 --epochs 2 --lr 0.01
""",
    "predict": """\
examples:
  cdul predict --checkpoint ./out/train --dataset ./new_images --format folder --output ./out/predictions
""",
}

# Printed with the required group of a subcommand whose required flags have exceptions.
REQUIRED_NOTE = {
    "label": " (unless in --config; --smoke-test alone needs neither)",
    "train": " (unless in --config)",
    "predict": " (unless in --config)",
}

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
    if cfg.report and summary.labeled_total:
        from cdul_ray.report import write_report

        report = write_report(summary.output, summary.evaluation, endpoint_override=cfg.s3_endpoint)
        print(storage.redact(f"  report         {report}"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from cdul_ray import schema, storage
    from cdul_ray.evaluate import evaluate_labels, render_table

    threshold = args.threshold
    run_config = storage.join(args.output, schema.RUN_CONFIG_FILE)
    if not storage.exists(run_config, args.s3_endpoint):
        raise config_mod.ConfigError("output", f"no labeling run at {args.output} (no run_config.json there); pass "
                                               "the --output directory of a `cdul label` run")
    labels = storage.join(args.output, schema.LABELS_DIR)
    try:
        parts = storage.list_files(labels, (".parquet",), args.s3_endpoint)
    except FileNotFoundError:
        parts = []
    if not parts:
        raise config_mod.ConfigError(
            "output", f"{args.output} holds a labeling run that did not finish: no label files in {labels}. Rerun its "
                      f"`cdul label` command (its config: {run_config}; the same --output resumes it), then evaluate")
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


def _subparser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser(defaults: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdul", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(sub, "label", "label a dataset with CDUL soft pseudo labels (CLIP global + snippet alignment)")
    config_mod.add_arguments(p, config_mod.LabelConfig, REQUIRED_NOTE["label"])
    p.set_defaults(func=_label)

    p = _subparser(sub, "evaluate", "pseudo-label mAP table and ζ sweep from a labeling run's Parquet alone")
    req = p.add_argument_group("required")
    p._action_groups.insert(1, p._action_groups.pop())  # listed before the options in --help
    req.add_argument("--output", required=True, metavar="OUTPUT",
                     help="output directory of a labeling run (local path or s3:// URI)")
    p.add_argument("--threshold", type=float, default=None, help="cdul threshold ζ in [0, 1] (default: the run's)")
    p.add_argument("--lam", type=float, default=0.0, help="λ of the initial soft label (default: 0)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-write", action="store_true", help="print only; do not write evaluation.json/.md")
    p.set_defaults(func=_evaluate)

    p = _subparser(sub, "demo", "offline demo: synthetic multi-object benchmark, bundled CLIP, Table 1 (+ Table 2)")
    from cdul_ray.demo import DemoConfig

    config_mod.add_arguments(p, DemoConfig)
    p.set_defaults(func=_demo)

    for name, (help_text, register) in EXTRA_COMMANDS.items():
        register(_subparser(sub, name, help_text))
    if defaults:
        for action in sub.choices.values():
            action.set_defaults(**defaults)
    return parser


# Later stages (train, predict, demo) register here: name -> (help, function adding arguments and func).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def configure_logging() -> None:
    """cdul-ray's own messages at INFO; other libraries' at WARNING (open_clip logs its model-loading steps at INFO on
    the root logger). Ray's loggers have their own handlers and levels."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cdul_ray").setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {storage.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: the output files committed so far are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except OSError as e:  # storage unreachable or denied mid-run (S3 network, permissions): one line, not a traceback
        if os.environ.get("CDUL_TRACEBACK"):
            raise
        print(f"error: {type(e).__name__}: {storage.redact(str(e))}\n(storage or network failure; committed output "
              "is kept and the same command resumes; CDUL_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------------------------------
# Training and batch prediction (cdul_ray.train, cdul_ray.predict; neither module imports Ray at import time).


def _job_command(module: str, config_name: str, run_name: str,
                 required_note: str = "") -> Callable[[argparse.ArgumentParser], None]:
    """Register a job whose flags are the fields of ``module.config_name`` and whose run is ``module.run_name``
    (a function of the config returning a summary with ``render()``); the module is imported when the command is
    built, Ray only when it runs. ``required_note``: see ``config.add_arguments``."""

    def run(args: argparse.Namespace) -> int:
        job = importlib.import_module(module)
        summary = getattr(job, run_name)(config_mod.from_args(getattr(job, config_name), args))
        print(storage.redact(summary.render()))
        return 0

    def register(parser: argparse.ArgumentParser) -> None:
        config_mod.add_arguments(parser, getattr(importlib.import_module(module), config_name), required_note)
        parser.set_defaults(func=run)

    return register


EXTRA_COMMANDS["train"] = (
    "train a classifier on the soft pseudo labels with gradient-alignment label updates (Ray Train)",
    _job_command("cdul_ray.train", "TrainConfig", "run_training", REQUIRED_NOTE["train"]),
)
EXTRA_COMMANDS["predict"] = (
    "batch inference with a trained classifier: per-class probabilities as Parquet (Ray Data)",
    _job_command("cdul_ray.predict", "PredictConfig", "run_prediction", REQUIRED_NOTE["predict"]),
)


if __name__ == "__main__":
    sys.exit(main())
