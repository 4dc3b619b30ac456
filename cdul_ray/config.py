"""Stage configs: frozen dataclasses, loadable from YAML, overridable on the command line, validated up front.

Every field has a ``help`` in its metadata; the CLI is generated from the fields (``add_arguments``), so a flag and a
YAML key always have the same name (``--threshold 0.3`` == ``threshold: 0.3``). ``validate()`` raises ``ConfigError``
naming the bad field before any cluster work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from cdul_ray.core.aggregate import AGGREGATORS
from cdul_ray.core.alignment import DEFAULT_TEMPLATES


class ConfigError(ValueError):
    """A config field is invalid; ``field`` names it, the message names the flag the user typed and the field.

    ``ConfigError("classes_file", "file not found: /x.txt")`` reads
    ``--classes-file (config field `classes_file`): file not found: /x.txt``. Pass ``flag=None`` for a name that is not
    a flag (an unknown YAML key).
    """

    def __init__(self, field_name: str, message: str, flag: str | None = ""):
        if flag == "":
            flag = flag_name(field_name)
        super().__init__(f"{field_prefix(field_name, flag)}: {message}")
        self.field = field_name
        self.flag = flag


def field_prefix(field_name: str, flag: str | None = "") -> str:
    """How every error names a config field: ``--classes-file (config field `classes_file`)``; without a flag (None),
    only the field."""
    flag = flag_name(field_name) if flag == "" else flag
    return f"{flag} (config field `{field_name}`)" if flag else f"config field `{field_name}`"


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``classes_file`` -> ``--classes-file``."""
    return "--" + field_name.replace("_", "-")


def choice_error(field_name: str, value: Any, choices: typing.Iterable[str]) -> ConfigError:
    """ConfigError for a value outside ``choices``, with a "did you mean" when one is close (difflib)."""
    import difflib

    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(field_name, f"{value!r} is not one of {', '.join(choices)}{hint}")


# Set by Ray's job supervisor in the environment of every `ray job submit` driver: {"metadata": {"job_submission_id":
# ...}, "runtime_env": ...} (ray/dashboard/modules/job/job_supervisor.py, _get_driver_env_vars, Ray 2.60).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def submitted_job_id() -> str | None:
    """The submission id when this process is the driver of a ``ray job submit`` job, else None."""
    import os

    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        meta = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        meta = {}
    return str(meta.get("job_submission_id") or "unknown")


def check_output_location(field_name: str, value: str) -> None:
    """Refuse a relative local output path in a ``ray job submit`` driver.

    Such a driver runs in Ray's temporary copy of ``--working-dir`` (under the session directory), so ``out/x`` would
    land there and vanish with it while the summary prints ``out/x``.

    Raises:
        ConfigError: ``value`` is a relative local path and this process is a submitted job's driver.
    """
    import os

    job = submitted_job_id()
    if job is None or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return
    raise ConfigError(field_name, f"{value!r} is a relative path, and this is a `ray job submit` job ({job}) that runs "
                                  f"in Ray's temporary working directory ({os.getcwd()}), which Ray removes once no "
                                  "job uses it: pass an absolute path (shared storage on a multi-node cluster) or an "
                                  "s3:// URI")


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its ``--help`` text (``metadata["help"]``); list/tuple defaults become tuple factories."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


GPU_MODES = ("auto", "true", "false")


def gpu_option(default: str, help: str) -> Any:
    """The ``use_gpu`` field of every job: ``auto`` (GPUs when the cluster has them), ``true`` or ``false``.

    On the command line ``--use-gpu`` alone means ``true`` and ``--no-use-gpu`` means ``false``; in YAML a boolean
    works too.
    """
    return option(default, help, gpu=True)


# --------------------------------------------------------------------------------------------------------------------
# Shared validators: each raises ConfigError naming the first bad field.


def require(cfg: Any, *names: str) -> None:
    """Each field is set (non-empty)."""
    for name in names:
        if not getattr(cfg, name):
            raise ConfigError(name, "is required")


def check_choice(cfg: Any, name: str, choices: tuple[str, ...]) -> None:
    """The field is one of ``choices`` (the error suggests the closest)."""
    value = getattr(cfg, name)
    if value not in choices:
        raise choice_error(name, value, choices)


def check_at_least(cfg: Any, low: float, *names: str) -> None:
    """Each field is >= ``low`` (fields that may be None are skipped when None)."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(name, f"must be >= {low}, got {value}")


def check_positive(cfg: Any, *names: str) -> None:
    """Each field is > 0."""
    for name in names:
        if not getattr(cfg, name) > 0:
            raise ConfigError(name, f"must be > 0, got {getattr(cfg, name)}")


def check_tristate(cfg: Any, *names: str) -> None:
    """Each field is ``auto``, ``true`` or ``false`` (``use_gpu``, ``cache_decoded``)."""
    for name in names:
        check_choice(cfg, name, GPU_MODES)


def check_dataset_input(cfg: Any, *required: str) -> None:
    """The required URIs, ``format`` and ``limit`` of a job that reads a dataset; a required ``output`` must not be a
    relative local path under ``ray job submit`` (``check_output_location``)."""
    from cdul_ray.datasets import FORMATS

    require(cfg, *required)
    if "output" in required:
        check_output_location("output", cfg.output)
    check_choice(cfg, "format", FORMATS)
    check_at_least(cfg, 1, "limit")


def _at_most(value: int | None, cap: int) -> int:
    """``cap`` for an unset field, else ``min(value, cap)``: a smoke test shrinks a value but keeps a bad one bad
    (labeling validates after shrinking, so ``value or cap`` would turn 0 into ``cap``)."""
    return cap if value is None else min(value, cap)


def check_actor_pool(cfg: Any) -> None:
    """``batch_size``, ``decode_batch_size``, ``rows_per_file``, actor pool size, ``use_gpu`` and ``cpus_per_actor`` of a
    streamed Ray Data job (cdul_ray.batch_inference)."""
    check_at_least(cfg, 1, "batch_size", "decode_batch_size", "min_actors", "rows_per_file")
    if cfg.max_actors is not None and cfg.max_actors < cfg.min_actors:
        raise ConfigError("max_actors", f"must be >= min_actors ({cfg.min_actors}), got {cfg.max_actors}")
    check_tristate(cfg, "use_gpu")
    check_positive(cfg, "cpus_per_actor")


# The bundled small CLIP and synthetic benchmark: what --smoke-test and the demo run on.
SMOKE_MODEL = ("cdul-synth-rn", "synth")
SMOKE_IMAGES = 8  # images of every --smoke-test: labeling, training and prediction
# ζ default; the paper searches [0, 0.4]. docs/benchmark.md records the current ζ sweep of the demo (re-measure it
# whenever the bundled CLIP changes).
DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class LabelConfig:
    """Config of the labeling job (global + local alignment, aggregator, initial soft pseudo labels)."""

    dataset: str = option("", "dataset root or manifest: local path or s3:// URI", required=True)
    output: str = option("", "output directory: local path or s3:// URI", required=True)
    format: str = option("auto", "dataset format: auto, coco, voc, nuswide, folder, manifest")
    split: str | None = option(None, "dataset split, e.g. train2014, val2017, trainval, train")
    classes_file: str | None = option(None, "class vocabulary (one class per line), overrides the dataset's classes")
    model: str = option("RN50x64", "open_clip model name, registered cdul-ray config, or local-dir:/path")
    pretrained: str = option("openai", "open_clip tag, bundled tag, local weights file, s3:// URI, or none")
    templates: tuple[str, ...] = option(DEFAULT_TEMPLATES, "prompt templates with one {} each (averaged per class)")
    grid: int = option(3, "snippet grid side K (K*K snippets per image)")
    aggregator: str = option("cdul", "global-local aggregator for the soft label: cdul, max, avg")
    threshold: float = option(DEFAULT_THRESHOLD, "cdul threshold zeta in [0, 1]: local = max if max >= zeta else min")
    lam: float = option(0.0, "lambda >= 0 of Y0 = (global + local) / 2 + lambda * |global - local|")
    batch_size: int = option(16, "images per CLIP batch (each image is 1 + K*K views)")
    decode_batch_size: int | None = option(
        None, "images per CPU decode/snippet task (default: blocks of about 32 MiB of views, 16-256 images)")
    min_actors: int = option(1, "CLIP actor pool: minimum size")
    max_actors: int | None = option(None, "CLIP actor pool: maximum size (default: GPUs incl. autoscaling, or 1 on CPU)")
    use_gpu: str = gpu_option("auto", "auto (GPU actors if the cluster has or can add GPUs), true, or false")
    cpus_per_actor: float = option(1.0, "CPUs reserved per CLIP actor")
    views: str = option("auto", "where views are cut and resized: exact (CPU, PIL, bit-exact open_clip transform), "
                                "device (torch on the CLIP actor's device; ships each image once), auto (device on GPU)")
    cpu_threads: int = option(0, "torch threads per CPU CLIP actor (0: the node's cores / CLIP actors on it)")
    precision: str = option("fp32", "CLIP compute precision: fp32, or amp (bfloat16 autocast on CUDA; scores stay fp32)")
    compile: bool = option(
        False, "torch.compile the CLIP image tower in each actor (inductor, frozen weights): ~1.4x faster small CLIPs "
               "on CPU for a one-off 5-30 s compile per actor, worth it from ~10,000 images per actor; falls back to "
               "eager if compiling fails")
    limit: int | None = option(None, "label only the first N images of the dataset")
    rows_per_file: int = option(
        1024, "minimum rows per output Parquet file (files close at a decode block): a killed job loses at most this "
              "plus one decode block; resume skips the rest")
    s3_endpoint: str | None = option(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)")
    cache_dir: str = option("~/.cache/cdul_ray", "per-node cache for weights fetched from S3")
    overwrite: bool = option(False, "delete the run in the output and start afresh (default: resume it, skipping done images)")
    evaluate: bool = option(True, "compute the pseudo-label mAP table when the dataset has ground truth")
    report: bool = option(True, "write report/ next to the labels: label sets per image, thresholds, PNG charts")
    smoke_test: bool = option(
        False, f"a few images ({SMOKE_IMAGES}) with the bundled small CLIP, on CPU (synthetic scenes if no dataset)"
    )

    def validate(self) -> "LabelConfig":
        """Check every field; returns self. Raises ConfigError naming the first bad field."""
        check_dataset_input(self, "dataset", "output")
        if self.classes_file and "://" not in self.classes_file:
            import os

            path = os.path.abspath(os.path.expanduser(self.classes_file))
            if not os.path.isfile(path):
                raise ConfigError("classes_file", f"file not found: {path} (a text file, one class name per line)")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError("templates", f"each template needs one '{{}}' placeholder, got {list(self.templates)}")
        check_at_least(self, 1, "grid")
        check_choice(self, "aggregator", AGGREGATORS)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        check_at_least(self, 0, "lam")
        check_actor_pool(self)
        check_choice(self, "precision", ("fp32", "amp"))
        check_choice(self, "views", ("auto", "exact", "device"))
        check_at_least(self, 0, "cpu_threads")
        return self

    def effective(self) -> "LabelConfig":
        """The config actually run: ``smoke_test`` shrinks the job to a few images, the bundled model and CPU.

        A smoke test without ``dataset`` labels a few generated synthetic scenes (``smoke_dataset``), and without
        ``output`` writes to ``out/smoke``.
        """
        if not self.smoke_test:
            return self
        default_data = not self.dataset
        return dataclasses.replace(
            self,
            dataset=self.dataset or self.smoke_dataset(),
            format="coco" if default_data else self.format,
            split="train" if default_data else self.split,
            output=self.output or "out/smoke",
            model=SMOKE_MODEL[0],
            pretrained=SMOKE_MODEL[1],
            limit=_at_most(self.limit, SMOKE_IMAGES),
            use_gpu="false",
            max_actors=1,
            min_actors=1,
            batch_size=min(self.batch_size, 4),
            decode_batch_size=_at_most(self.decode_batch_size, 4),
        )

    def smoke_dataset(self) -> str:
        """Where a smoke test without ``dataset`` generates its synthetic scenes (under ``cache_dir``)."""
        import os

        return os.path.join(os.path.expanduser(self.cache_dir), "smoke-synth")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------------------------------------------------
# Generic YAML / CLI plumbing shared by every stage config.


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return _base_type(args[0])
    return tp


def _coerce(cls: type, name: str, value: Any) -> Any:
    hints = typing.get_type_hints(cls)
    tp = _base_type(hints[name])
    if value is None:
        return None
    if {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("gpu"):
        return ("true" if value else "false") if isinstance(value, bool) else str(value).lower()
    try:
        if typing.get_origin(tp) is tuple:
            if isinstance(value, str):
                value = [value]
            return tuple(str(v) for v in value)
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(name, f"cannot read {value!r} as {getattr(tp, '__name__', tp)}") from e
    return value


def from_mapping(cls: type, values: dict[str, Any]) -> Any:
    """Build a config from a mapping (YAML), rejecting unknown keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(names), n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigError(unknown[0], f"unknown field in the YAML file; {hint}valid fields: {', '.join(sorted(names))}",
                          flag=None)
    return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def load_yaml(cls: type, path: str) -> Any:
    from cdul_ray import storage

    data = yaml.safe_load(storage.read_bytes(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of field: value")
    return from_mapping(cls, data)


def _default_text(default: Any) -> str | None:
    """How a default reads in ``--help``: None when there is nothing worth printing."""
    if default is None or default == "":
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return " ".join(repr(v) if " " in str(v) else str(v) for v in default)
    return str(default)


def _help_text(f: dataclasses.Field) -> str:
    """A field's ``--help`` line: its help, then its default unless the help already tells it (``%`` escaped)."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    help_text = f.metadata.get("help", "")
    shown = _default_text(default)
    if shown is not None and "default" not in help_text:
        help_text += f" (default: {shown})"
    return help_text.replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, cls: type, required_note: str = "") -> None:
    """One ``--flag`` per config field (underscores become dashes), all defaulting to 'not given'.

    Fields with ``required=True`` metadata are listed in their own "required" group (argparse cannot enforce them:
    ``--config`` may supply them, and ``--smoke-test`` some); ``required_note`` says when they are not needed.
    """
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = None
    if any(f.metadata.get("required") for f in fields):
        required = parser.add_argument_group(f"required{required_note}")
        parser._action_groups.insert(1, parser._action_groups.pop())  # listed before the options in --help
    parser.add_argument("--config", metavar="YAML", help="YAML file of field: value (flags on the command line win)")
    for f in fields:
        flag = flag_name(f.name)
        tp = _base_type(hints[f.name])
        help_text = _help_text(f)
        group = required if f.metadata.get("required") else parser
        if f.metadata.get("gpu"):
            group.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, metavar="{auto,true,false}",
                               help=help_text + "; the flag alone means true")
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="false",
                               help=f"same as {flag} false")
        elif tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar=f.name.upper(), help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """YAML (``--config``) first, then every flag given on the command line."""
    base = load_yaml(cls, args.config) if getattr(args, "config", None) else cls()
    overrides = {
        f.name: _coerce(cls, f.name, getattr(args, f.name))
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **overrides)
