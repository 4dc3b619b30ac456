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
        prefix = f"{flag} (config field `{field_name}`)" if flag else f"config field `{field_name}`"
        super().__init__(f"{prefix}: {message}")
        self.field = field_name
        self.flag = flag


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: ``classes_file`` -> ``--classes-file``."""
    return "--" + field_name.replace("_", "-")


def choice_error(field_name: str, value: Any, choices: "typing.Iterable[str]") -> ConfigError:
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


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# The bundled small CLIP and synthetic benchmark: what --smoke-test and the demo run on.
SMOKE_MODEL = ("cdul-synth-rn", "synth")
SMOKE_IMAGES = 8
# ζ default; the paper searches [0, 0.4]. docs/benchmark.md records the current ζ sweep of the demo (re-measure it
# whenever the bundled CLIP changes).
DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class LabelConfig:
    """Config of the labeling job (global + local alignment, aggregator, initial soft pseudo labels)."""

    dataset: str = _f("", "dataset root or manifest: local path or s3:// URI", required=True)
    output: str = _f("", "output directory: local path or s3:// URI", required=True)
    format: str = _f("auto", "dataset format: auto, coco, voc, nuswide, folder, manifest")
    split: str | None = _f(None, "dataset split, e.g. train2014, val2017, trainval, train")
    classes_file: str | None = _f(None, "class vocabulary (one class per line), overrides the dataset's classes")
    model: str = _f("RN50x64", "open_clip model name, registered cdul-ray config, or local-dir:/path")
    pretrained: str = _f("openai", "open_clip tag, bundled tag, local weights file, s3:// URI, or none")
    templates: tuple[str, ...] = _f(DEFAULT_TEMPLATES, "prompt templates with one {} each (averaged per class)")
    grid: int = _f(3, "snippet grid side K (K*K snippets per image)")
    aggregator: str = _f("cdul", "global-local aggregator for the soft label: cdul, max, avg")
    threshold: float = _f(DEFAULT_THRESHOLD, "cdul threshold zeta in [0, 1]: local = max if max >= zeta else min")
    lam: float = _f(0.0, "lambda >= 0 of Y0 = (global + local) / 2 + lambda * |global - local|")
    batch_size: int = _f(16, "images per CLIP batch (each image is 1 + K*K views)")
    decode_batch_size: int = _f(16, "images per CPU decode/snippet task")
    min_actors: int = _f(1, "CLIP actor pool: minimum size")
    max_actors: int | None = _f(None, "CLIP actor pool: maximum size (default: GPUs incl. autoscaling, or 1 on CPU)")
    use_gpu: str = _f("auto", "auto (GPU actors if the cluster has or can add GPUs), true, or false")
    cpus_per_actor: float = _f(1.0, "CPUs reserved per CLIP actor")
    precision: str = _f("fp32", "CLIP compute precision: fp32, or amp (bfloat16 autocast on CUDA; scores stay fp32)")
    limit: int | None = _f(None, "label only the first N images of the dataset")
    rows_per_file: int = _f(1024, "rows per output Parquet file: the most a killed job loses (resume skips the rest)")
    s3_endpoint: str | None = _f(None, "S3-compatible endpoint URL (default: AWS_ENDPOINT_URL or AWS itself)")
    cache_dir: str = _f("~/.cache/cdul_ray", "per-node cache for weights fetched from S3")
    overwrite: bool = _f(False, "delete the run in the output and start afresh (default: resume it, skipping done images)")
    evaluate: bool = _f(True, "compute the pseudo-label mAP table when the dataset has ground truth")
    report: bool = _f(True, "write report/ next to the labels: label sets per image, thresholds, PNG charts")
    smoke_test: bool = _f(
        False, f"a few images ({SMOKE_IMAGES}) with the bundled small CLIP, on CPU (synthetic scenes if no dataset)"
    )

    def validate(self) -> "LabelConfig":
        """Check every field; returns self. Raises ConfigError naming the first bad field."""
        from cdul_ray.datasets import FORMATS

        if not self.dataset:
            raise ConfigError("dataset", "is required")
        if not self.output:
            raise ConfigError("output", "is required")
        check_output_location("output", self.output)
        if self.format not in FORMATS:
            raise choice_error("format", self.format, FORMATS)
        if self.classes_file and "://" not in self.classes_file:
            import os

            path = os.path.abspath(os.path.expanduser(self.classes_file))
            if not os.path.isfile(path):
                raise ConfigError("classes_file", f"file not found: {path} (a text file, one class name per line)")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError("templates", f"each template needs one '{{}}' placeholder, got {list(self.templates)}")
        if self.grid < 1:
            raise ConfigError("grid", f"must be >= 1, got {self.grid}")
        if self.aggregator not in AGGREGATORS:
            raise choice_error("aggregator", self.aggregator, AGGREGATORS)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in [0, 1], got {self.threshold}")
        if self.lam < 0:
            raise ConfigError("lam", f"must be >= 0, got {self.lam}")
        for name in ("batch_size", "decode_batch_size", "min_actors", "rows_per_file"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ConfigError("max_actors", f"must be >= min_actors ({self.min_actors}), got {self.max_actors}")
        if self.use_gpu not in ("auto", "true", "false"):
            raise choice_error("use_gpu", self.use_gpu, ("auto", "true", "false"))
        if self.precision not in ("fp32", "amp"):
            raise choice_error("precision", self.precision, ("fp32", "amp"))
        if self.cpus_per_actor <= 0:
            raise ConfigError("cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1, got {self.limit}")
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
            limit=min(self.limit or SMOKE_IMAGES, SMOKE_IMAGES),
            use_gpu="false",
            max_actors=1,
            min_actors=1,
            batch_size=min(self.batch_size, 4),
            decode_batch_size=min(self.decode_batch_size, 4),
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
    options = parser
    options.add_argument("--config", metavar="YAML", help="YAML file of field: value (flags on the command line win)")
    for f in fields:
        flag = flag_name(f.name)
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        shown = _default_text(default)
        if shown is not None and "default" not in help_text:
            help_text += f" (default: {shown})"
        help_text = help_text.replace("%", "%%")
        group = required if f.metadata.get("required") else options
        metavar = f.name.upper()
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(tp) is tuple:
            group.add_argument(flag, dest=f.name, nargs="+", default=None, metavar=metavar, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_text)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """YAML (``--config``) first, then every flag given on the command line."""
    base = load_yaml(cls, args.config) if getattr(args, "config", None) else cls()
    overrides = {
        f.name: _coerce(cls, f.name, getattr(args, f.name))
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(base, **overrides)
