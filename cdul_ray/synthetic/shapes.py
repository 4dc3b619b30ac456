"""Shape geometry of the offline benchmark world: class polygons and their anti-aliased coverage masks.

Pure PIL/NumPy. ``cdul_ray.synthetic.world`` draws every object with :func:`render_alpha`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # anti-aliasing factor of the shape masks
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "triangle",
    "square",
    "star",
    "heart",
    "cross",
    "ring",
    "crescent",
    "arrow",
    "hexagon",
    "diamond",
    "lightning bolt",
)


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _circle(radius: float = 1.0, center: tuple[float, float] = (0.0, 0.0), n: int = 64) -> np.ndarray:
    return _regular(n, radius, 0.0) + np.asarray(center)


@functools.lru_cache(maxsize=None)
def shape_geometry(name: str) -> tuple[tuple[np.ndarray, bool], ...]:
    """Polygons of a class in unit coordinates (x right, y down), centred, farthest point at distance 1.

    Args:
        name: a class of ``CLASS_NAMES``.

    Returns:
        ``((vertices [P, 2], fill), ...)`` drawn in order; ``fill=False`` polygons cut holes.
    """
    if name == "circle":
        polys = [(_circle(), True)]
    elif name == "ring":
        polys = [(_circle(), True), (_circle(0.55), False)]
    elif name == "crescent":
        polys = [(_circle(), True), (_circle(0.85, (0.45, -0.1)), False)]
    elif name == "triangle":
        polys = [(_regular(3), True)]
    elif name == "square":
        polys = [(_regular(4, phase=math.pi / 4), True)]
    elif name == "diamond":
        polys = [(np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]]), True)]
    elif name == "hexagon":
        polys = [(_regular(6), True)]
    elif name == "star":
        outer, inner = _regular(5, 1.0), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        polys = [(np.stack([outer, inner], axis=1).reshape(10, 2), True)]
    elif name == "cross":
        a = 0.3
        polys = [
            (
                np.array(
                    [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a],
                     [-a, -a]]
                ),
                True,
            )
        ]
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        polys = [(np.stack([x, y], axis=1), True)]
    elif name == "arrow":
        polys = [
            (np.array([[-1.0, -0.18], [0.2, -0.18], [0.2, -0.55], [1.0, 0.0], [0.2, 0.55], [0.2, 0.18], [-1.0, 0.18]]),
             True)
        ]
    elif name == "lightning bolt":
        polys = [
            (np.array([[0.05, -1.0], [0.55, -1.0], [0.15, -0.2], [0.5, -0.2], [-0.3, 1.0], [-0.05, 0.15],
                       [-0.45, 0.15]]), True)
        ]
    else:
        raise ValueError(f"unknown class {name!r}; valid: {list(CLASS_NAMES)}")
    # Centre on the bounding box of the filled outline, then scale so that the farthest vertex is at distance 1.
    outline = np.concatenate([p for p, fill in polys if fill])
    center = (outline.min(0) + outline.max(0)) / 2
    scale = np.linalg.norm(outline - center, axis=1).max()
    out = []
    for p, fill in polys:
        q = ((p - center) / scale).astype(np.float64)
        q.setflags(write=False)
        out.append((q, fill))
    return tuple(out)


def render_alpha(
    name: str, cx: float, cy: float, radius: float, angle: float, stretch: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage mask of one object.

    Args:
        name: class name.
        cx: centre x in pixels (sub-pixel precision).
        cy: centre y in pixels.
        radius: distance in pixels from the centre to the farthest point of the shape.
        angle: rotation in radians.
        stretch: (sx, sy) scale applied before the rotation.

    Returns:
        ``(alpha [h, w] float32 in [0, 1], x0, y0)``: the mask and the image position of its top-left pixel
        (may be negative or run past the image: the caller clips).
    """
    side = int(math.ceil(2 * radius)) + 3
    x0, y0 = int(math.floor(cx)) - side // 2, int(math.floor(cy)) - side // 2
    ox, oy = cx - x0, cy - y0  # centre in patch coordinates
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    ss = SUPERSAMPLE
    mask = Image.new("L", (side * ss, side * ss), 0)
    draw = ImageDraw.Draw(mask)
    for verts, fill in shape_geometry(name):
        pts = (verts * np.asarray(stretch)) @ rot.T * radius + np.array([ox, oy])
        draw.polygon([(float(x) * ss, float(y) * ss) for x, y in pts], fill=255 if fill else 0)
    alpha = np.asarray(mask.resize((side, side), Image.BOX), dtype=np.float32) / 255.0
    return alpha, x0, y0
