"""The labeling job on Ray Data: index -> CPU decode/snippet stage -> CLIP actor pool -> Parquet.

Stages (each a ``map_batches``; Ray Data streams blocks between them, so decoding overlaps CLIP):

1. ``decode_views`` (Ray tasks, CPU): fetch bytes through pyarrow filesystems (local or S3), decode with PIL, and
   either cut the K×K snippets and apply the geometric half of open_clip's eval transform (``views=exact``: uint8
   views [B, 1+S, 3, H, W]) or ship each decoded image once (``views=device``, the default on GPUs: uint8
   [3, height, width] per image). Unreadable or undecodable images become error rows (the job goes on). Its CPU
   reservation differs from the actor's so that Ray Data does not fuse it into the actor (``decode_cpus``).
2. ``ClipScorer`` (actor pool, ``compute=ActorPoolStrategy``, ``num_gpus=1`` per actor on GPU clusters): cuts the
   views on the device when they come uncut, normalises on the device, encodes global views and snippets of the
   whole batch in one pass, computes global/local alignment, α/β/mean and the soft pseudo label (cdul_ray.core),
   returns a small Arrow table (no pixels). CPU actors run torch on the node's cores (``cpu_threads``); with
   ``--compile`` the image tower is compiled once per actor (``clip.image_encoder``).
3. The scored rows (a few floats per class and image) are streamed to ``labels/`` and ``errors/`` Parquet datasets
   (:mod:`cdul_ray.batch_inference`).

Speed: docs/performance.md (bench/label_efficiency.py, bench/label_scaling.py, bench/gpu.sh).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cdul_ray import schema, storage
from cdul_ray.batch_inference import OutputExistsError, Stage, count_rows, prepare_output, stream_to_parquet
from cdul_ray.config import LabelConfig
from cdul_ray.resources import actor_pool, cpu_threads, decode_batch_rows, decode_cpus, label_block_bytes

logger = logging.getLogger(__name__)

__all__ = ["ClipScorer", "LabelSummary", "OutputExistsError", "decode_views", "run_labeling"]


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
    except Exception as e:  # an image smaller than the K×K grid (a 1×1 image): cdul_ray.images decodes it
        return None, 0, 0, "decode", f"{type(e).__name__}: {e}"


def decode_views(
    batch: dict[str, np.ndarray], preprocess: dict[str, Any], grid: int, endpoint_override: str | None,
    views: str = "exact",
) -> dict[str, np.ndarray]:
    """Ray Data UDF (CPU tasks): index rows -> uint8 views of the global image and its K×K snippets.

    Input batch: ``image_id``, ``uri``, ``gt_labels`` [B]. Output adds ``width``, ``height`` [B] int32 (pixels),
    ``error_stage``, ``error_reason`` [B] str ("" when ok) and ``views``:

    - ``views="exact"``: [B, 1+S, 3, H, W] uint8, cut and resized here (zeros on error rows);
    - ``views="device"``: B whole images, each [3, height, width] uint8 ([3, 1, 1] zeros on error rows), cut and
      resized by the CLIP actor (``core.views.cut_views``).
    """
    device = views == "device"
    geometric = None if device else _geometric(json.dumps(preprocess, sort_keys=True))
    results = [_read_and_cut(str(u), geometric, grid, endpoint_override) for u in batch["uri"]]
    out = dict(batch)
    if device:
        out["views"] = np.empty(len(results), dtype=object)  # ragged: one [3, height, width] array per image
        for i, r in enumerate(results):
            out["views"][i] = r[0] if r[0] is not None else np.zeros((3, 1, 1), dtype=np.uint8)
    else:
        from cdul_ray.clip import view_size

        empty = np.zeros((1 + grid * grid, 3, *view_size(preprocess)), dtype=np.uint8)
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
        views: str = "exact",
        threads: int = 0,
        actors: int = 1,
        batch_size: int = 16,
        compile: bool = False,
    ):
        import torch

        from cdul_ray.clip import image_encoder, load_clip, view_size
        from cdul_ray.core.alignment import class_text_embeddings
        from cdul_ray.core.views import split_eval_transform

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(threads, len(os.sched_getaffinity(0)), actors))
        self.model, tokenizer = load_clip(spec, self.device, cache_dir, endpoint_override)
        self.geometric, self.mean, self.std = split_eval_transform(spec.preprocess)
        self.views = views
        with torch.inference_mode():
            self.text = class_text_embeddings(self.model.encode_text, tokenizer, classes, templates, self.device)
        self.num_classes = len(classes)
        self.grid, self.aggregator, self.threshold, self.lam = grid, aggregator, threshold, lam
        # method.md §2: fp32 or autocast (fp16 weights have produced NaNs); alignment_scores upcasts to fp32 anyway
        self.autocast = precision == "amp" and self.device.type == "cuda"
        self.encode = image_encoder(self.model, batch_size * (1 + grid * grid), view_size(spec.preprocess),
                                    self.device, self.autocast, compile)
        self.out_schema = schema.labels_schema(self.num_classes).append(pa.field("error_stage", pa.string())).append(
            pa.field("error_reason", pa.string())
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        torch = self.torch
        from cdul_ray.core.aggregate import aggregate, initial_soft_label, snippet_stats
        from cdul_ray.core.alignment import alignment_scores
        from cdul_ray.core.views import cut_views, normalize

        views = batch["views"]  # exact: (B, 1+S, 3, H, W) uint8; device: B images [3, height, width] uint8
        b, v = len(views), 1 + self.grid * self.grid
        c = self.num_classes
        ok = np.array([s == "" for s in batch["error_stage"]])
        scores = np.zeros((len(schema.SCORE_COLUMNS), b, c), dtype=np.float32)  # (5, B, C)
        stage = np.array(batch["error_stage"], dtype=object)
        reason = np.array(batch["error_reason"], dtype=object)
        if ok.any():
            with torch.inference_mode():
                if self.views == "device":
                    images = [torch.from_numpy(np.require(views[i], np.uint8, ("C", "W"))).to(self.device)
                              for i in np.flatnonzero(ok)]
                    x = cut_views(images, self.geometric, self.grid)  # (B', 1+S, 3, H, W) uint8
                else:
                    x = torch.from_numpy(np.require(views[ok], np.uint8, ("C", "W"))).to(self.device)
                x = normalize(x.flatten(0, 1), self.mean, self.std)  # (B'*(1+S), 3, H, W)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
                    feats = self.encode(x)  # (B'*(1+S), D)
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
            "gt_labels": pa.array([_class_indices(g) for g in batch["gt_labels"]], pa.list_(pa.int32())),
        }
        vec = pa.list_(pa.float32(), c)
        for k, name in enumerate(schema.SCORE_COLUMNS):
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(scores[k].reshape(-1)), c).cast(vec)
        cols["error_stage"] = pa.array([str(s) for s in stage], pa.string())
        cols["error_reason"] = pa.array([str(s) for s in reason], pa.string())
        return pa.table(cols, schema=self.out_schema)


def _class_indices(value: Any) -> list[int] | None:
    """A ``gt_labels`` cell as Ray Data hands it over -> class indices, or None when the dataset has no ground truth.

    A column that is null in every row of a batch arrives as a float NaN per row, not as None.
    """
    if value is None or np.ndim(value) == 0:
        return None
    return [int(i) for i in value]


# --------------------------------------------------------------------------------------------------------------------
# The job


# Fields that define a labeling run's values: a run into an output that holds labels made with other values is refused.
LABEL_DEFINING_FIELDS = ("model", "pretrained", "classes", "templates", "grid", "aggregator", "threshold", "lam",
                         "precision")


# From this many images, a CPU run that does not pass --compile is told what compiling would save (docs/performance.md:
# the compile costs 5-30 s per actor and saves about 1.5 ms per image of the bundled CLIP on 2 cores).
COMPILE_HINT_IMAGES = 20_000


# The views a run's labels were computed from, once ``--views auto`` is resolved (exact on CPU actors, device on GPU
# actors): recorded in run_config.json and, like LABEL_DEFINING_FIELDS, never mixed in one output.
VIEWS_USED = "views_used"
DECODE_ROWS_USED = "decode_batch_rows_used"  # images per decode block, once --decode-batch-size is resolved


def _check_views_used(cfg: LabelConfig, views: str, endpoint: str | None) -> None:
    """Refuse to add labels computed from ``views`` to an output whose labels came from the other kind of views.

    Device-cut views differ from open_clip's exact PIL views by up to ~0.07 in a score (docs/performance.md), so a
    run started on CPU actors and resumed on GPU actors with ``--views auto`` would mix two label sets. Checked once
    the actor pool is decided (``auto`` depends on it), before any actor starts.

    Raises:
        OutputExistsError: the output's run used the other views; the message names ``--views`` and the value that
            resumes it.
    """
    path = storage.join(cfg.output, schema.RUN_CONFIG_FILE)
    previous = storage.read_json(path, endpoint).get(VIEWS_USED) if storage.exists(path, endpoint) else None
    if previous and previous != views:
        raise OutputExistsError(
            f"{cfg.output} holds labels computed from {previous} views, and this run would use {views} views "
            f"(--views {cfg.views}{' on GPU actors' if views == 'device' else ' on CPU actors'}). Mixing the two "
            f"would corrupt the output: pass --views {previous} to resume it, another --output, or --overwrite")


@dataclass(frozen=True)
class LabelSummary:
    """What a labeling run did.

    ``images`` is the corpus index of this run; ``already_done`` the images an earlier run into the same output had
    labeled (or recorded as errors); ``labeled`` and ``errors`` what this run added; ``labeled_total`` and
    ``errors_total`` what ``labels/`` and ``errors/`` hold now. ``images_per_second`` counts the images of this run
    over its wall time.
    """

    output: str
    images: int
    already_done: int
    labeled: int
    errors: int
    labeled_total: int
    errors_total: int
    seconds: float
    images_per_second: float
    classes: int
    evaluation: dict[str, Any] | None

    def render(self) -> str:
        errors_dir = storage.join(self.output, schema.ERRORS_DIR)
        lines = [
            "CDUL labeling finished",
            f"  images in      {self.images}",
            f"  already done   {self.already_done}" + ("  (earlier runs into this output; skipped)"
                                                        if self.already_done else ""),
            f"  labeled now    {self.labeled}",
            f"  errors now     {self.errors}" + (f"  (see {errors_dir})" if self.errors else ""),
            f"  output holds   {self.labeled_total} labels, {self.errors_total} errors",
            f"  classes        {self.classes}",
            f"  wall time      {self.seconds:.1f} s  ({self.images_per_second:.2f} images/s)",
            f"  soft labels    {storage.join(self.output, schema.LABELS_DIR)}",
        ]
        if self.evaluation:
            lines.append(f"  evaluation     {storage.join(self.output, schema.EVALUATION_MD)}")
        elif self.evaluation is None and self.labeled_total:
            lines.append("  evaluation     skipped: the dataset has no ground truth")
        return "\n".join(lines)


def _prepare_output_and_weights(cfg: LabelConfig, endpoint: str | None, run_config: dict[str, Any]) -> Any:
    """The output checked (before the weights: a hub download can take minutes), then the weights resolved; a
    failed check leaves no empty output directory behind. Returns the ``WeightsSpec``."""
    from cdul_ray.clip import resolve_weights

    try:
        fresh_output = not storage.exists(cfg.output, endpoint)
    except OSError:  # denied or unreachable: prepare_output raises the ConfigError that names the storage's reason
        fresh_output = False
    prepare_output(cfg.output, endpoint, cfg.overwrite, run_config, LABEL_DEFINING_FIELDS, "label")
    try:
        return resolve_weights(cfg.model, cfg.pretrained, endpoint_override=endpoint)
    except Exception:
        if fresh_output:
            storage.delete_dir_if_empty(cfg.output, endpoint)
        raise


def run_labeling(cfg: LabelConfig) -> LabelSummary:
    """Label every image of a dataset with CDUL soft pseudo labels (method.md §1-§5) and evaluate them.

    Output is streamed to ``labels/`` and ``errors/`` while the job runs; running the same command again into the
    same output labels only the images not yet there (after a kill, a lost node, or new images in the dataset); see
    :mod:`cdul_ray.batch_inference`. Everything that can fail fast does so before any Ray work: config validation,
    the dataset index, the output directory (a different label-defining config is refused), the weights.

    Raises:
        ConfigError, FileNotFoundError, WeightsNotFoundError, UnknownModelError, OutputExistsError.
    """
    import ray

    from cdul_ray.clip import view_size
    from cdul_ray.datasets import load_dataset
    from cdul_ray.evaluate import evaluate_labels

    cfg = cfg.effective().validate()
    start = time.time()
    if cfg.smoke_test and cfg.dataset == cfg.smoke_dataset():
        from cdul_ray.synthetic.generate import generate

        generate(cfg.dataset, seed=0, counts={"train": cfg.limit or 8, "val": 0, "test": 0})
    endpoint = cfg.s3_endpoint or storage.s3_endpoint_from_env()
    cfg = dataclasses.replace(cfg, s3_endpoint=endpoint)
    index = load_dataset(cfg.dataset, cfg.format, cfg.split, cfg.classes_file, endpoint, cfg.limit).excluding(
        cfg.output)  # an output inside a folder dataset: its report PNGs are not images to label
    classes = list(index.classes)
    run_config = {"kind": "label", **cfg.to_dict(), "classes": classes}
    spec = _prepare_output_and_weights(cfg, endpoint, run_config)
    n_images = index.records.num_rows
    logger.info("%d images, %d classes, model %s/%s (%s)", n_images, len(classes), cfg.model, cfg.pretrained, spec.kind)

    if not ray.is_initialized():
        ray.init()
    use_gpu, min_actors, max_actors = actor_pool(cfg)
    views = cfg.views if cfg.views != "auto" else ("device" if use_gpu else "exact")
    if cfg.compile:  # the actors' own "compiled in N s" line is at INFO in their processes: say it here
        logger.info("--compile: each CLIP actor compiles the image tower before its first batch (10-30 s the first "
                    "time on a node, 5-10 s from inductor's cache); if compiling fails, it logs why and runs eagerly")
    elif not use_gpu and n_images >= COMPILE_HINT_IMAGES:
        logger.info("%d images on CPU CLIP actors: --compile makes the CLIP forward ~1.4x faster for a one-off "
                    "5-30 s compile per actor (docs/performance.md)", n_images)
    _check_views_used(cfg, views, endpoint)
    run_config[VIEWS_USED] = views
    decode_rows = decode_batch_rows(cfg.decode_batch_size,
                                    label_block_bytes(views, view_size(spec.preprocess), cfg.grid))
    run_config[DECODE_ROWS_USED] = decode_rows  # what --decode-batch-size (auto by default) resolved to
    storage.write_json(storage.join(cfg.output, schema.CLASSES_FILE), {"classes": classes, "templates": list(cfg.templates)}, endpoint)
    storage.write_json(storage.join(cfg.output, schema.RUN_CONFIG_FILE), run_config, endpoint)

    decode = Stage(decode_views, decode_rows,
                   {"preprocess": spec.preprocess, "grid": cfg.grid, "endpoint_override": endpoint, "views": views},
                   num_cpus=decode_cpus(cfg.cpus_per_actor))
    actor_kwargs = {"spec": spec, "classes": classes, "templates": list(cfg.templates), "grid": cfg.grid,
                    "aggregator": cfg.aggregator, "threshold": cfg.threshold, "lam": cfg.lam,
                    "cache_dir": cfg.cache_dir, "endpoint_override": endpoint, "precision": cfg.precision,
                    "views": views, "threads": cfg.cpu_threads, "actors": max_actors or 1,
                    "batch_size": cfg.batch_size, "compile": cfg.compile}
    score = Stage(ClipScorer, cfg.batch_size, actor_kwargs, num_cpus=cfg.cpus_per_actor,
                  num_gpus=1 if use_gpu else 0, actors=(min_actors, max_actors))
    written = stream_to_parquet(index.records, cfg.output, endpoint, schema.LABELS_DIR, (decode, score),
                                cfg.rows_per_file)
    labeled_total = count_rows(cfg.output, endpoint, schema.LABELS_DIR)
    errors_total = count_rows(cfg.output, endpoint, schema.ERRORS_DIR)

    evaluation = None
    if cfg.evaluate and index.has_ground_truth and labeled_total:
        evaluation = evaluate_labels(cfg.output, threshold=cfg.threshold, lam=cfg.lam, endpoint_override=endpoint)
    elif cfg.evaluate and not index.has_ground_truth:
        logger.info("evaluation skipped: the dataset has no ground truth (pseudo-label mAP needs annotations)")
    seconds = time.time() - start
    summary = LabelSummary(
        output=cfg.output,
        images=n_images,
        already_done=n_images - written.results - written.errors,
        labeled=written.results,
        errors=written.errors,
        labeled_total=labeled_total,
        errors_total=errors_total,
        seconds=seconds,
        images_per_second=(written.results + written.errors) / seconds if seconds else 0.0,
        classes=len(classes),
        evaluation=evaluation,
    )
    storage.write_json(storage.join(cfg.output, schema.SUMMARY_FILE), dataclasses.asdict(summary), endpoint)
    return summary
