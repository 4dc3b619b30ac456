"""The paper's Table 2 (§4.2) on a held-out split with ground truth: what each way of labeling a new image scores
(test mAP) and costs (inference images/s).

Rows, top to bottom (method.md §2-§6):

1. CLIP zero-shot, global alignment only: one CLIP forward per image.
2. CDUL soft pseudo labels computed on the test images themselves: 1 + K² CLIP forwards per image, no training.
3. The classifier trained on fixed CDUL pseudo labels: one classifier forward per image.
4. The classifier trained with gradient-alignment label updates (paper §3.2).
5. The classifier trained on the ground truth of the same training images: the fully supervised ceiling.

mAP of rows 1-2 comes from a labeling run of the test split (``cdul label``); rows 3-5 from training runs
(``cdul train``, ``eval_split`` = the test split). Inference images/s is measured here, in this process, on the
same test images for every row: read + decode + the row's preprocessing + forward, batches of 32, all the cores
of the machine, after one untimed warm-up batch; the best of three passes, the rows interleaved pass by pass. It is
the cost of the method, not of the Ray pipeline around it (docs/performance.md measures that).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from cdul_ray import schema, storage

BATCH = 32


@dataclass(frozen=True)
class Table2Row:
    """One row: ``test_map`` in % (NaN when not measured), ``images_per_s`` of inference on this machine."""

    method: str
    inference: str  # what one new image costs, e.g. "10 CLIP forwards"
    test_map: float
    images_per_s: float


def images_per_second(steps: dict[str, Callable[[list[str]], Any]], uris: list[str], batch_size: int = BATCH,
                      rounds: int = 3) -> dict[str, float]:
    """Steady-state images/s of each step (a batch of image URIs -> scores) over ``uris``: the best of ``rounds``
    timed passes, the steps interleaved round by round (so a burst of load on a shared machine does not land on one
    row only); each pass starts with an untimed warm-up batch.

    Raises:
        ValueError: fewer than two batches of images, or ``rounds`` < 1.
    """
    batches = [uris[i:i + batch_size] for i in range(0, len(uris), batch_size)]
    if len(batches) < 2:
        raise ValueError(f"{len(uris)} images: at least {batch_size + 1} are needed to time a warm batch")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            step(batches[0])
            start, n = time.perf_counter(), 0
            for batch in batches[1:]:
                step(batch)
                n += len(batch)
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def _index_batch(uris: list[str]) -> dict[str, np.ndarray]:
    return {"image_id": np.array(uris, dtype=object), "uri": np.array(uris, dtype=object),
            "gt_labels": np.array([None] * len(uris), dtype=object)}


def clip_steps(labeling_output: str, endpoint: str | None = None) -> tuple[Callable, Callable]:
    """(global-only step, CDUL step) with the CLIP, classes, templates, grid, aggregator, ζ and λ of a labeling run.

    The CDUL step is the product's own decode (``pipeline.decode_views``) and CLIP scorer (``pipeline.ClipScorer``);
    the global step cuts and scores the global view alone.
    """
    import torch

    from cdul_ray.clip import resolve_weights
    from cdul_ray.core.alignment import alignment_scores
    from cdul_ray.core.views import normalize
    from cdul_ray.pipeline import ClipScorer, decode_views

    run = storage.read_json(storage.join(labeling_output, schema.RUN_CONFIG_FILE), endpoint)
    classes = storage.read_json(storage.join(labeling_output, schema.CLASSES_FILE), endpoint)
    spec = resolve_weights(run["model"], run["pretrained"], endpoint_override=endpoint)
    scorer = ClipScorer(spec, classes["classes"], classes["templates"], run["grid"], run["aggregator"],
                        run["threshold"], run["lam"], run["cache_dir"], endpoint, views="exact")

    def cdul(uris: list[str]) -> Any:
        return scorer(decode_views(_index_batch(uris), spec.preprocess, run["grid"], endpoint, views="exact"))

    def global_only(uris: list[str]) -> Any:
        views = []
        for uri in uris:
            image, _, _ = storage.read_image(uri, endpoint)
            if image is not None:
                views.append(np.asarray(scorer.geometric(image.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1))
        with torch.inference_mode():
            x = normalize(torch.from_numpy(np.stack(views)), scorer.mean, scorer.std)  # (B, 3, H, W)
            return alignment_scores(scorer.model.encode_image(x), scorer.text, scorer.model.logit_scale)  # (B, C)

    return global_only, cdul


def clip_forwards(labeling_output: str, endpoint: str | None = None) -> int:
    """CLIP forwards per image of a labeling run's CDUL labels: 1 global view + K² snippets (method.md §3)."""
    grid = storage.read_json(storage.join(labeling_output, schema.RUN_CONFIG_FILE), endpoint)["grid"]
    return 1 + grid * grid


def classifier_step(model_dir: str, endpoint: str | None = None) -> Callable:
    """The product's prediction path (``classifier.decode_resized`` + ``predict.Predictor``) for a trained model."""
    from cdul_ray.classifier import decode_resized
    from cdul_ray.predict import Predictor

    predictor = Predictor(model_dir, endpoint)
    size = predictor.meta["image_size"]
    return lambda uris: predictor(decode_resized(_index_batch(uris), size, endpoint))


def clip_maps(labeling_output: str, endpoint: str | None = None) -> tuple[float, float]:
    """(global-alignment mAP, CDUL soft-label mAP) in % of a labeling run of a split with ground truth, with the run's
    aggregator, ζ and λ. Raises ValueError without ground truth."""
    from cdul_ray.core.metrics import mean_average_precision
    from cdul_ray.evaluate import read_label_scores, soft_labels

    run = storage.read_json(storage.join(labeling_output, schema.RUN_CONFIG_FILE), endpoint)
    scores = read_label_scores(labeling_output, endpoint)
    if scores.targets is None:
        raise ValueError(f"{labeling_output}: the split has no ground truth; Table 2 needs a labeled test split")
    cdul = soft_labels(scores, run["aggregator"], run["threshold"], run["lam"])
    return (mean_average_precision(scores.global_score, scores.targets).map,
            mean_average_precision(cdul, scores.targets).map)


def render(rows: list[Table2Row], split: str, images: int) -> str:
    """The table as markdown."""
    def fmt(v: float, digits: int) -> str:
        return "—" if math.isnan(v) else f"{v:.{digits}f}"

    lines = [f"| method ({split} split, {images} images) | inference | test mAP | images/s |", "|---|---|---:|---:|"]
    lines += [f"| {r.method} | {r.inference} | {fmt(r.test_map, 1)} | {fmt(r.images_per_s, 1)} |" for r in rows]
    return "\n".join(lines)


def as_dict(rows: list[Table2Row]) -> list[dict[str, Any]]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in rows]
