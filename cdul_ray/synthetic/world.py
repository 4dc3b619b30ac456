"""The offline benchmark world: shapes, colours, clutter backgrounds, single-object images and multi-object scenes.

Pure PIL/NumPy, no torch. Every sample is a function of a NumPy ``Generator`` seeded from
``(seed, stream, index)`` (see :func:`sample_rng`), so any single image can be regenerated on its own and
generation is byte-for-byte deterministic for a given seed (same NumPy, Pillow and libjpeg).

The world:

* ``CLASS_NAMES``: 12 shape classes with natural-language names ("lightning bolt", not "lightning_bolt").
* ``COLORS``: 12 named colours, drawn independently of the class (colour is no shortcut to the class).
* Backgrounds: a random colour gradient, smooth low-frequency colour noise, and low-to-mid contrast clutter
  (soft-edged irregular blobs, thin lines and arcs: nothing that looks like a class), then pixel noise and
  sometimes a slight blur.
* Objects: a class polygon, randomly rotated (full 360 degrees), mildly stretched (up to +-10 %), shaded with a
  linear brightness ramp, at a random position. The object colour is kept at least ``MIN_COLOR_DISTANCE``
  (RGB Euclidean) from the background's mean colour so that every labelled object is visible.
* Single-object images (:func:`make_single_object`): one object filling 30-90 % of the frame side, at most
  15 % of its radius outside the frame, rendered at 64-128 px and JPEG round-tripped (quality 75-95): the
  look of a K x K snippet of a scene. This is the only thing the small CLIP ever sees in training.
* Scenes (:func:`make_scene`): one large object (35-60 % of the image side) plus one to three small ones
  (10-22 % of the side) on clutter. Small objects are drawn over the large one; partial overlap is allowed
  (a small object's box may cover up to 35 % of another object's box). Classes may repeat.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cdul_ray.synthetic.shapes import CLASS_NAMES, render_alpha

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (130, 80, 40),
    "gray": (128, 128, 128),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Streams of independent samples under one seed (see sample_rng).
STREAMS: dict[str, int] = {"train": 1, "val": 2, "test": 3, "single": 10}

MIN_COLOR_DISTANCE = 90.0  # RGB distance between an object's colour and its background's mean colour
COLOR_JITTER = 20.0  # uniform +- jitter per channel around the named colour

SINGLE_SIZE_RANGE = (64, 128)  # render size of single-object images, px
SINGLE_DIAMETER_RANGE = (0.30, 0.90)  # object diameter / frame side
SINGLE_MAX_OUTSIDE = 0.15  # fraction of the radius that may lie outside the frame
SINGLE_JPEG_QUALITY = (75, 95)

SCENE_SIZE = 224
LARGE_DIAMETER_RANGE = (0.35, 0.60)  # large object's diameter / image side
SMALL_DIAMETER_RANGE = (0.10, 0.22)  # small objects' diameter / image side
SMALL_COUNT_RANGE = (1, 3)
MAX_BOX_OVERLAP = 0.35  # max fraction of an earlier object's box (or of the new one) a small object's box may cover
PLACEMENT_TRIES = 100

CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "a {}.")
CAPTION_TEMPLATE_P: tuple[float, ...] = (0.6, 0.2, 0.2)
CAPTION_COLOR_P = 0.25  # probability that a caption names the colour ("a photo of a red triangle.")


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """Generator of sample ``index`` of ``stream`` under ``seed``, independent of every other sample.

    Args:
        seed: the generation seed.
        stream: one of ``STREAMS`` ("train", "val", "test" scenes; "single" single-object images).
        index: sample index within the stream.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; valid: {sorted(STREAMS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS[stream], int(index)]))


# ----------------------------------------------------------------------------------------------------------------
# Background and compositing
# ----------------------------------------------------------------------------------------------------------------


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cluttered background: gradient, smooth colour noise, low-to-mid contrast strokes and blobs.

    Returns:
        ``[H, W, 3]`` float32 image in [0, 255].
    """
    c1 = rng.uniform(30, 225, 3)
    c2 = np.clip(c1 + rng.normal(0, 40, 3), 0, 255)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]
    t = xx * math.cos(theta) + yy * math.sin(theta)  # (H, W)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = (c1.astype(np.float32) * (1 - t[..., None]) + c2.astype(np.float32) * t[..., None]).astype(np.float32)

    # Smooth low-frequency colour noise.
    g = int(rng.integers(3, 9))
    small = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    base = base + (smooth - 127.5) * (rng.uniform(10, 35) / 127.5)
    base = np.clip(base, 0, 255)

    # Clutter, low-to-mid contrast: soft (blurred) blobs that resemble no class, then thin lines and arcs.
    mean = base.reshape(-1, 3).mean(0)
    contrast = rng.uniform(20, 55)
    side = max(height, width)

    def stroke_color() -> tuple[int, int, int]:
        return tuple(int(v) for v in np.clip(mean + rng.normal(0, contrast, 3), 0, 255))

    blobs = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(2, 9))):  # irregular blobs
        c = rng.uniform(0, side, 2)
        k = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * math.pi, k))
        rad = rng.uniform(0.04, 0.18, k) * side
        draw.polygon([(float(c[0] + r * math.cos(a)), float(c[1] + r * math.sin(a))) for a, r in zip(ang, rad)],
                     fill=stroke_color())
    blobs = blobs.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.02, 0.05)) * side))
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.integers(3, 13))):  # lines
        p = rng.uniform(-0.1, 1.1, 4) * side
        draw.line([(p[0], p[1]), (p[2], p[3])], fill=stroke_color(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 5))):  # arcs
        c = rng.uniform(0, side, 2)
        r = rng.uniform(0.1, 0.5) * side
        a0 = rng.uniform(0, 360)
        draw.arc([c[0] - r, c[1] - r, c[0] + r, c[1] + r], a0, a0 + rng.uniform(30, 180), fill=stroke_color(),
                 width=int(rng.integers(1, 3)))
    opacity = rng.uniform(0.3, 0.7)
    return base * (1 - opacity) + np.asarray(blobs, dtype=np.float32) * opacity


def pick_color(rng: np.random.Generator, background_mean: np.ndarray) -> tuple[str, np.ndarray]:
    """A named colour (jittered) far enough from the background's mean colour to be visible.

    Returns:
        ``(colour name, RGB float32 [3])``.
    """
    for _ in range(50):
        name = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
        rgb = np.clip(np.asarray(COLORS[name], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3), 0, 255)
        if float(np.linalg.norm(rgb - background_mean)) >= MIN_COLOR_DISTANCE:
            return name, rgb.astype(np.float32)
    # Unreachable in practice (the palette spans the RGB cube); fall back to the farthest palette colour.
    name = max(COLOR_NAMES, key=lambda n: float(np.linalg.norm(np.asarray(COLORS[n]) - background_mean)))
    return name, np.asarray(COLORS[name], np.float32)


def composite(img: np.ndarray, alpha: np.ndarray, x0: int, y0: int, rgb: np.ndarray, rng: np.random.Generator) -> None:
    """Paint an object (coverage ``alpha`` at ``(x0, y0)``) in colour ``rgb`` with a linear shading ramp, in place.

    Args:
        img: ``[H, W, 3]`` float32 canvas.
        alpha: ``[h, w]`` coverage.
        x0: image x of the mask's left column.
        y0: image y of the mask's top row.
        rgb: ``[3]`` fill colour.
        rng: source of the shading direction and strength.
    """
    h, w = alpha.shape
    H, W = img.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    a = alpha[ya - y0:yb - y0, xa - x0:xb - x0, None]  # (h', w', 1)
    theta = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.25)
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    ramp = ((xx - w / 2) * math.cos(theta) + (yy - h / 2) * math.sin(theta)) / max(h, w)  # in [-0.5, 0.5]
    shade = (1 + strength * 2 * ramp)[ya - y0:yb - y0, xa - x0:xb - x0, None]
    fill = np.clip(rgb[None, None, :] * shade, 0, 255)
    region = img[ya:yb, xa:xb]
    img[ya:yb, xa:xb] = region * (1 - a) + fill * a


def finish(img: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Pixel noise and an occasional slight blur; returns the uint8 RGB image."""
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.0))))
    return out


def _random_pose(rng: np.random.Generator) -> tuple[float, tuple[float, float]]:
    angle = float(rng.uniform(0, 2 * math.pi))
    stretch = (float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1)))
    return angle, stretch


# ----------------------------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SingleObject:
    """A single-object image and its caption.

    Attributes:
        image: RGB image (JPEG round-tripped).
        label: index into ``CLASS_NAMES``.
        color: colour name.
        caption: training caption, e.g. "a photo of a red triangle.".
    """

    image: Image.Image
    label: int
    color: str
    caption: str


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        label: index into ``CLASS_NAMES``.
        color: colour name.
        bbox: tight box ``[x, y, w, h]`` (pixels) of the drawn shape, clipped to the image.
        area: covered area in pixels (sum of the anti-aliased coverage, before occlusion).
        large: True for the scene's one large object.
    """

    label: int
    color: str
    bbox: tuple[float, float, float, float]
    area: float
    large: bool


def caption_for(rng: np.random.Generator, label: int, color: str) -> str:
    """Training caption: template and colour mention drawn at random (``CAPTION_TEMPLATE_P``, ``CAPTION_COLOR_P``)."""
    template = CAPTION_TEMPLATES[int(rng.choice(len(CAPTION_TEMPLATES), p=CAPTION_TEMPLATE_P))]
    noun = CLASS_NAMES[label]
    if rng.random() < CAPTION_COLOR_P:
        noun = f"{color} {noun}"
    return template.format(noun)


def all_captions() -> list[str]:
    """Every caption :func:`caption_for` can produce, in a fixed order."""
    out = []
    for template in CAPTION_TEMPLATES:
        for name in CLASS_NAMES:
            out.append(template.format(name))
            out.extend(template.format(f"{color} {name}") for color in COLOR_NAMES)
    return out


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def make_single_object(rng: np.random.Generator, label: int | None = None) -> SingleObject:
    """One object filling most of a cluttered frame, the look of a scene snippet.

    Args:
        rng: sample generator (:func:`sample_rng` with stream "single").
        label: class index; drawn uniformly when None.
    """
    size = int(rng.integers(SINGLE_SIZE_RANGE[0], SINGLE_SIZE_RANGE[1] + 1))
    if label is None:
        label = int(rng.integers(len(CLASS_NAMES)))
    img = make_background(rng, size, size)
    color, rgb = pick_color(rng, img.reshape(-1, 3).mean(0))
    radius = float(rng.uniform(*SINGLE_DIAMETER_RANGE)) * size / 2
    lo, hi = radius * (1 - SINGLE_MAX_OUTSIDE), size - radius * (1 - SINGLE_MAX_OUTSIDE)
    cx, cy = (float(rng.uniform(lo, hi)) for _ in range(2))
    angle, stretch = _random_pose(rng)
    alpha, x0, y0 = render_alpha(CLASS_NAMES[label], cx, cy, radius, angle, stretch)
    composite(img, alpha, x0, y0, rgb, rng)
    image = _jpeg_roundtrip(finish(img, rng), int(rng.integers(SINGLE_JPEG_QUALITY[0], SINGLE_JPEG_QUALITY[1] + 1)))
    return SingleObject(image=image, label=label, color=color, caption=caption_for(rng, label, color))


def single_object(seed: int, index: int) -> SingleObject:
    """Single-object image ``index`` of the "single" stream under ``seed``."""
    return make_single_object(sample_rng(seed, "single", index))


def _box_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection area over the smaller box's area; boxes are ``[x, y, w, h]``."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / max(min(a[2] * a[3], b[2] * b[3]), 1e-6)


def _tight_box(alpha: np.ndarray, x0: int, y0: int, width: int, height: int) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(alpha >= 0.5)
    if len(xs) == 0:
        ys, xs = np.nonzero(alpha > 0)
    xa, ya = max(int(xs.min()) + x0, 0), max(int(ys.min()) + y0, 0)
    xb, yb = min(int(xs.max()) + x0 + 1, width), min(int(ys.max()) + y0 + 1, height)
    return float(xa), float(ya), float(xb - xa), float(yb - ya)


def make_scene(rng: np.random.Generator, size: int = SCENE_SIZE) -> tuple[Image.Image, list[SceneObject]]:
    """A multi-object scene: one large object and one to three small ones on clutter.

    Objects lie fully inside the image. The large object is drawn first; small objects are drawn over it and may
    partially overlap it and each other (box overlap at most ``MAX_BOX_OVERLAP`` of the smaller box).

    Args:
        rng: sample generator (:func:`sample_rng` with stream "train", "val" or "test").
        size: image side in pixels.

    Returns:
        ``(image, objects)``, the large object first.
    """
    img = make_background(rng, size, size)
    bg_mean = img.reshape(-1, 3).mean(0)
    n_small = int(rng.integers(SMALL_COUNT_RANGE[0], SMALL_COUNT_RANGE[1] + 1))
    objects: list[SceneObject] = []
    for k in range(1 + n_small):
        large = k == 0
        label = int(rng.integers(len(CLASS_NAMES)))
        color, rgb = pick_color(rng, bg_mean)
        d_range = LARGE_DIAMETER_RANGE if large else SMALL_DIAMETER_RANGE
        radius = float(rng.uniform(*d_range)) * size / 2
        angle, stretch = _random_pose(rng)
        r_eff = radius * max(stretch)
        for _ in range(PLACEMENT_TRIES):
            cx, cy = (float(rng.uniform(r_eff + 1, size - r_eff - 1)) for _ in range(2))
            box = (cx - r_eff, cy - r_eff, 2 * r_eff, 2 * r_eff)
            if all(_box_overlap(box, o.bbox) <= MAX_BOX_OVERLAP for o in objects):
                break
        alpha, x0, y0 = render_alpha(CLASS_NAMES[label], cx, cy, radius, angle, stretch)
        composite(img, alpha, x0, y0, rgb, rng)
        objects.append(
            SceneObject(label=label, color=color, bbox=_tight_box(alpha, x0, y0, size, size),
                        area=round(float(alpha.sum()), 2), large=large)
        )
    return finish(img, rng), objects


def single_object_arrays(
    seed: int, start: int, stop: int, size: int, labels: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Single-object images ``start..stop-1`` of the "single" stream, resized for a model (no torch).

    The resize is PIL bicubic to ``size x size``, which is exactly what open_clip's eval preprocess
    (``Resize(size, bicubic)`` + ``CenterCrop(size)`` on a square PIL image) does before ``ToTensor``. Picklable,
    so it can run in worker processes.

    Args:
        seed: generation seed.
        start: first sample index.
        stop: one past the last sample index.
        size: output side in pixels.
        labels: if given, ``labels[i - start]`` is the class of sample ``i`` (e.g. balanced evaluation sets).

    Returns:
        ``(images [N, size, size, 3] uint8, labels [N] int64, captions)``.
    """
    n = stop - start
    images = np.empty((n, size, size, 3), np.uint8)
    out_labels = np.empty(n, np.int64)
    captions = []
    for k, i in enumerate(range(start, stop)):
        sample = make_single_object(sample_rng(seed, "single", i), None if labels is None else int(labels[k]))
        images[k] = np.asarray(sample.image.resize((size, size), Image.BICUBIC))
        out_labels[k] = sample.label
        captions.append(sample.caption)
    return images, out_labels, captions
