"""The labeling job on Ray Data: index -> CPU decode/snippet stage -> CLIP actor pool -> Parquet.

Stages (each a ``map_batches``; Ray Data streams blocks between them, so decoding overlaps CLIP):

1. ``decode_views`` (Ray tasks, CPU): fetch bytes through pyarrow filesystems (local or S3), decode with PIL, cut the
   K×K snippets and apply the geometric half of open_clip's eval transform; ships uint8 views [B, 1+S, 3, H, W].
   Unreadable or undecodable images become error rows (the job goes on).
2. ``ClipScorer`` (actor pool, ``compute=ActorPoolStrategy``, ``num_gpus=1`` per actor on GPU clusters): normalises
   on the device, encodes global views and snippets of the whole batch in one pass, computes global/local alignment,
   α/β/mean and the soft pseudo label (cdul_ray.core), returns a small Arrow table (no pixels).
3. The scored rows (a few floats per class and image) are materialised once, then split into ``labels/`` and
   ``errors/`` Parquet datasets, so CLIP never runs twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdul_ray import schema, storage
from cdul_ray.config import LabelConfig

logger = logging.getLogger(__name__)

_ERROR_COLS = ("error_stage", "error_reason")


class OutputExistsError(FileExistsError):
    """The output directory already holds a labeling run and ``overwrite`` is off."""


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: CPU decode + snippets


@functools.lru_cache(maxsize=4)
def _geometric(preprocess_json: str):
    from cdul_ray.core.views import split_eval_transform

    return split_eval_transform(json.loads(preprocess_json))[0]


def _read_and_cut(uri: str, geometric, grid: int, endpoint: str | None) -> tuple[np.ndarray | None, int, int, str, str]:
    """One image -> (views [1+S, 3, H, W] uint8 or None, width, height, error stage, error reason)."""
    from cdul_ray.core.views import make_views

    im, stage, reason = storage.read_image(uri, endpoint)  # the decode shared with training and prediction
    if im is None:
        return None, 0, 0, stage, reason
    try:
        return make_views(im, geometric, grid), im.width, im.height, "", ""
    except Exception as e:  # image smaller than the grid
        return None, 0, 0, "decode", f"{type(e).__name__}: {e}"


def decode_views(
    batch: dict[str, np.ndarray], preprocess: dict[str, Any], grid: int, endpoint_override: str | None
) -> dict[str, np.ndarray]:
    """Ray Data UDF (CPU tasks): index rows -> uint8 views of the global image and its K×K snippets.

    Input batch: ``image_id``, ``uri``, ``gt_labels`` [B]. Output adds ``width``, ``height`` [B] int32 (pixels),
    ``views`` [B, 1+S, 3, H, W] uint8 (zeros on error rows), ``error_stage``, ``error_reason`` [B] str ("" when ok).
    """
    geometric = _geometric(json.dumps(preprocess, sort_keys=True))
    size = preprocess["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    results = [_read_and_cut(str(u), geometric, grid, endpoint_override) for u in batch["uri"]]
    empty = np.zeros((1 + grid * grid, 3, *hw), dtype=np.uint8)
    out = dict(batch)
    out["views"] = np.stack([r[0] if r[0] is not None else empty for r in results])  # (B, 1+S, 3, H, W)
    out["width"] = np.array([r[1] for r in results], dtype=np.int32)
    out["height"] = np.array([r[2] for r in results], dtype=np.int32)
    out["error_stage"] = np.array([r[3] for r in results], dtype=object)
    out["error_reason"] = np.array([r[4] for r in results], dtype=object)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: CLIP actor


class ClipScorer:
    """Ray Data callable class: CLIP global + local alignment and aggregation for a batch of images.

    Heavy state (model, class text embeddings T [C, D]) is built once per actor in ``__init__``.
    Returns an Arrow table with ``schema.labels_schema(C)`` columns plus ``error_stage``/``error_reason``.
    """

    def __init__(
        self,
        spec: Any,
        classes: list[str],
        templates: list[str],
        grid: int,
        aggregator: str,
        threshold: float,
        lam: float,
        cache_dir: str,
        endpoint_override: str | None,
        precision: str = "fp32",
    ):
        import torch

        from cdul_ray.clip import load_clip
        from cdul_ray.core.alignment import class_text_embeddings
        from cdul_ray.core.views import split_eval_transform

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, tokenizer = load_clip(spec, self.device, cache_dir, endpoint_override)
        _, self.mean, self.std = split_eval_transform(spec.preprocess)
        with torch.inference_mode():
            self.text = class_text_embeddings(self.model.encode_text, tokenizer, classes, templates, self.device)
        self.num_classes = len(classes)
        self.grid, self.aggregator, self.threshold, self.lam = grid, aggregator, threshold, lam
        # method.md §2: fp32 or autocast (fp16 weights have produced NaNs); alignment_scores upcasts to fp32 anyway
        self.autocast = precision == "amp" and self.device.type == "cuda"
        self.out_schema = schema.labels_schema(self.num_classes).append(pa.field("error_stage", pa.string())).append(
            pa.field("error_reason", pa.string())
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        torch = self.torch
        from cdul_ray.core.aggregate import aggregate, initial_soft_label, snippet_stats
        from cdul_ray.core.alignment import alignment_scores
        from cdul_ray.core.views import normalize

        views = batch["views"]  # (B, 1+S, 3, H, W) uint8
        b, v = views.shape[:2]
        c = self.num_classes
        ok = np.array([s == "" for s in batch["error_stage"]])
        scores = np.zeros((len(schema.SCORE_COLUMNS), b, c), dtype=np.float32)  # (5, B, C)
        stage = np.array(batch["error_stage"], dtype=object)
        reason = np.array(batch["error_reason"], dtype=object)
        if ok.any():
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(views[ok])).to(self.device)  # (B', 1+S, 3, H, W)
                x = normalize(x.flatten(0, 1), self.mean, self.std)  # (B'*(1+S), 3, H, W)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    feats = self.model.encode_image(x)  # (B'*(1+S), D)
                probs = alignment_scores(feats, self.text, self.model.logit_scale).view(-1, v, c)  # (B', 1+S, C)
                g = probs[:, 0]  # (B', C) global alignment
                alpha, beta, mean = snippet_stats(probs[:, 1:])  # each (B', C), local alignment
                y0 = initial_soft_label(g, aggregate(alpha, beta, mean, self.aggregator, self.threshold), self.lam)
                out = torch.stack([g, alpha, beta, mean, y0]).float().cpu().numpy()  # (5, B', C)
            finite = np.isfinite(out).all(axis=(0, 2))
            scores[:, ok] = np.nan_to_num(out)
            idx = np.flatnonzero(ok)[~finite]
            stage[idx] = "clip"
            reason[idx] = "non-finite CLIP scores (NaN/inf); check the weights' precision"
        cols: dict[str, Any] = {
            "image_id": pa.array([str(x) for x in batch["image_id"]], pa.string()),
            "uri": pa.array([str(x) for x in batch["uri"]], pa.string()),
            "width": pa.array(batch["width"], pa.int32()),
            "height": pa.array(batch["height"], pa.int32()),
            "gt_labels": pa.array([None if g is None else [int(i) for i in g] for g in batch["gt_labels"]],
                                  pa.list_(pa.int32())),
        }
        vec = pa.list_(pa.float32(), c)
        for k, name in enumerate(schema.SCORE_COLUMNS):
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(scores[k].reshape(-1)), c).cast(vec)
        cols["error_stage"] = pa.array([str(s) for s in stage], pa.string())
        cols["error_reason"] = pa.array([str(s) for s in reason], pa.string())
        return pa.table(cols, schema=self.out_schema)


def select_labels(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["error_stage"], "")).drop_columns(list(_ERROR_COLS))


def select_errors(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.not_equal(table["error_stage"], ""))
    return pa.table(
        {"image_id": bad["image_id"], "uri": bad["uri"], "stage": bad["error_stage"], "reason": bad["error_reason"]},
        schema=schema.ERRORS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class LabelSummary:
    """What a labeling run did. ``images_per_second`` counts input images over the whole run's wall time."""

    output: str
    images: int
    labeled: int
    errors: int
    seconds: float
    images_per_second: float
    classes: int
    evaluation: dict[str, Any] | None

    def render(self) -> str:
        lines = [
            "CDUL labeling finished",
            f"  images in      {self.images}",
            f"  labeled        {self.labeled}",
            f"  errors         {self.errors}" + (f"  (see {storage.join(self.output, schema.ERRORS_DIR)})" if self.errors else ""),
            f"  classes        {self.classes}",
            f"  wall time      {self.seconds:.1f} s  ({self.images_per_second:.2f} images/s)",
            f"  soft labels    {storage.join(self.output, schema.LABELS_DIR)}",
        ]
        if self.evaluation:
            lines.append(f"  evaluation     {storage.join(self.output, schema.EVALUATION_MD)}")
        return "\n".join(lines)


def check_output(cfg: LabelConfig) -> None:
    fs, path = storage.filesystem(cfg.output, cfg.s3_endpoint)
    from pyarrow.fs import FileSelector, FileType

    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        return
    if info.type != FileType.Directory:
        raise OutputExistsError(f"config field `output`: {cfg.output} exists and is not a directory")
    if not fs.get_file_info(FileSelector(path, allow_not_found=True)):
        return
    if not cfg.overwrite:
        raise OutputExistsError(
            f"config field `output`: {cfg.output} is not empty; pass --overwrite to replace it or choose another output"
        )
    if fs.get_file_info(storage.fs_path(path, schema.RUN_CONFIG_FILE)).type == FileType.NotFound:
        # --overwrite only ever replaces a labeling run, never an arbitrary directory (`--output ~ --overwrite`)
        raise OutputExistsError(
            f"config field `output`: {cfg.output} is not empty and holds no labeling run ({schema.RUN_CONFIG_FILE}); "
            "refusing to delete it even with --overwrite"
        )
    fs.delete_dir_contents(path)


def actor_resources(cfg: LabelConfig) -> tuple[bool, int, int]:
    """(use GPU, min actors, max actors) from the config and the cluster's resources."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = {"true": True, "false": False}.get(cfg.use_gpu, gpus > 0)
    if use_gpu and cfg.use_gpu == "true" and gpus == 0:
        logger.warning("use_gpu=true but the cluster reports no GPU yet; actors will wait for GPU nodes (autoscaler)")
    default_max = max(gpus, 1) if use_gpu else 1
    max_actors = cfg.max_actors or max(default_max, cfg.min_actors)
    return use_gpu, cfg.min_actors, max_actors


def run_labeling(cfg: LabelConfig) -> LabelSummary:
    """Label every image of a dataset with CDUL soft pseudo labels (method.md §1-§5) and evaluate them.

    Everything that can fail fast does so before any Ray work: config validation, the dataset index, the weights,
    the output directory.

    Raises:
        ConfigError, FileNotFoundError, WeightsNotFoundError, UnknownModelError, OutputExistsError.
    """
    import ray

    from cdul_ray.clip import resolve_weights
    from cdul_ray.datasets import load_dataset
    from cdul_ray.evaluate import evaluate_labels

    cfg = cfg.effective().validate()
    start = time.time()
    if cfg.smoke_test and cfg.dataset == cfg.smoke_dataset():
        from cdul_ray.synthetic.generate import generate

        generate(cfg.dataset, seed=0, counts={"train": cfg.limit or 8, "val": 0, "test": 0})
    endpoint = cfg.s3_endpoint or storage.s3_endpoint_from_env()
    cfg = dataclasses.replace(cfg, s3_endpoint=endpoint)
    index = load_dataset(cfg.dataset, cfg.format, cfg.split, cfg.classes_file, endpoint, cfg.limit)
    check_output(cfg)  # before resolving weights: a hub download can take minutes
    spec = resolve_weights(cfg.model, cfg.pretrained, endpoint_override=endpoint)
    n_images = index.records.num_rows
    logger.info("%d images, %d classes, model %s/%s (%s)", n_images, len(index.classes), cfg.model, cfg.pretrained, spec.kind)

    if not ray.is_initialized():
        ray.init()
    use_gpu, min_actors, max_actors = actor_resources(cfg)
    classes = list(index.classes)
    storage.write_json(storage.join(cfg.output, schema.CLASSES_FILE), {"classes": classes, "templates": list(cfg.templates)}, endpoint)
    storage.write_json(storage.join(cfg.output, schema.RUN_CONFIG_FILE), cfg.to_dict(), endpoint)

    import ray.data

    n_blocks = max(1, min(n_images // max(cfg.decode_batch_size, 1), 2000))
    ds = ray.data.from_arrow(index.records).repartition(n_blocks)
    ds = ds.map_batches(
        decode_views,
        fn_kwargs={"preprocess": spec.preprocess, "grid": cfg.grid, "endpoint_override": endpoint},
        batch_size=cfg.decode_batch_size,
        num_cpus=1,
    )
    actor_kwargs = {
        "spec": spec,
        "classes": classes,
        "templates": list(cfg.templates),
        "grid": cfg.grid,
        "aggregator": cfg.aggregator,
        "threshold": cfg.threshold,
        "lam": cfg.lam,
        "cache_dir": cfg.cache_dir,
        "endpoint_override": endpoint,
        "precision": cfg.precision,
    }
    ds = ds.map_batches(
        ClipScorer,
        fn_constructor_kwargs=actor_kwargs,
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
    )
    scored = ds.materialize()

    fs, out_path = storage.filesystem(cfg.output, endpoint)
    labels = scored.map_batches(select_labels, batch_format="pyarrow", batch_size=None)
    errors = scored.map_batches(select_errors, batch_format="pyarrow", batch_size=None)
    labels.write_parquet(storage.fs_path(out_path, schema.LABELS_DIR), filesystem=fs)
    n_errors = errors.count()
    if n_errors:
        errors.write_parquet(storage.fs_path(out_path, schema.ERRORS_DIR), filesystem=fs)
    else:  # an empty errors table keeps the layout fixed for readers
        import pyarrow.parquet as pq

        fs.create_dir(storage.fs_path(out_path, schema.ERRORS_DIR), recursive=True)
        pq.write_table(schema.ERRORS_SCHEMA.empty_table(), storage.fs_path(out_path, schema.ERRORS_DIR, schema.EMPTY_ERRORS_FILE), filesystem=fs)
    n_labeled = n_images - n_errors

    evaluation = None
    if cfg.evaluate and index.has_ground_truth and n_labeled:
        evaluation = evaluate_labels(cfg.output, threshold=cfg.threshold, lam=cfg.lam, endpoint_override=endpoint)
    seconds = time.time() - start
    summary = LabelSummary(
        output=cfg.output,
        images=n_images,
        labeled=n_labeled,
        errors=n_errors,
        seconds=seconds,
        images_per_second=n_images / seconds if seconds else 0.0,
        classes=len(classes),
        evaluation=evaluation,
    )
    storage.write_json(storage.join(cfg.output, schema.SUMMARY_FILE), dataclasses.asdict(summary), endpoint)
    return summary
