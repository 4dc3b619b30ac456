"""Hostile image files as test fixtures: every case a user's corpus throws at the decoder, written as a folder dataset
(no ground truth) and as a COCO dataset.

``hostile_images()`` returns ``{file name: Case}``; each case says whether the labeling job must label it (and the
upright size it must report) or turn it into an error row (the stage and a substring of the reason).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import CLASSES

# A subfolder and a file name with spaces and non-ASCII characters (the image itself is a plain JPEG).
UNICODE_DIR = "dir with spaces"
UNICODE_NAME = "éléphant 象 photo.jpg"


@dataclass(frozen=True)
class Case:
    data: bytes
    size: tuple[int, int] | None = None  # upright (width, height) when the image must be labeled
    stage: str | None = None  # error stage when it must not
    reason: str | None = None  # substring of the error reason


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width``×``height`` 8-bit grayscale pixels, followed by an empty image stream.

    The decompression-bomb shape without the bomb's payload: anything that decodes it before checking the size fails
    on the data (or allocates width×height bytes); a decoder that checks the header first refuses it cheaply.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def exif_rotated_jpeg(stored_w: int = 64, stored_h: int = 40) -> bytes:
    """A JPEG stored ``stored_w``×``stored_h`` (landscape) with EXIF orientation 6: upright it is portrait.

    The stored image's left half is red and right half blue, so upright (rotated 90° clockwise) the top is red.
    """
    arr = np.zeros((stored_h, stored_w, 3), dtype=np.uint8)
    arr[:, : stored_w // 2] = (255, 0, 0)
    arr[:, stored_w // 2 :] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° CW to display
    return _save(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def gray16_png() -> bytes:
    """16-bit grayscale PNG (8×6): row r holds the value r * 13107 (0, 13107, ..., 65535) -> 8 bit r * 51."""
    arr = (np.arange(6, dtype=np.uint16)[:, None] * 13107).repeat(8, axis=1)
    return _save(Image.fromarray(arr), "PNG")  # mode I;16


def palette_transparent_png() -> bytes:
    """Palette PNG 10×10: index 0 (stored green) is transparent (left half), index 1 red (right half)."""
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (5, 0, 10, 10))
    return _save(im, "PNG", transparency=0)


def rgba_png() -> bytes:
    """RGBA 12×8: left half blue fully transparent, right half red half-transparent (alpha 128)."""
    arr = np.zeros((8, 12, 4), dtype=np.uint8)
    arr[:, :6] = (0, 0, 255, 0)
    arr[:, 6:] = (255, 0, 0, 128)
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def animated_gif() -> bytes:
    """Two-frame GIF 16×12: the first frame red, the second blue."""
    frames = [Image.new("RGB", (16, 12), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff() -> bytes:
    """Two-page TIFF: page 1 green 20×10, page 2 blue 30×30."""
    pages = [Image.new("RGB", (20, 10), (0, 255, 0)), Image.new("RGB", (30, 30), (0, 0, 255))]
    return _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def cmyk_jpeg() -> bytes:
    """CMYK JPEG 24×16, pure cyan (C=255, M=Y=K=0)."""
    return _save(Image.new("CMYK", (24, 16), (255, 0, 0, 0)), "JPEG", quality=95)


def hostile_images() -> dict[str, Case]:
    """Every hostile case by file name (all names end in an image suffix the folder reader lists)."""
    good = _save(Image.fromarray(_noise(48, 36, 1)), "JPEG", quality=90)
    truncated_src = _save(Image.fromarray(_noise(64, 64, 2)), "JPEG", quality=95)
    return {
        "zero_byte.jpg": Case(b"", stage="decode", reason="empty file (0 bytes)"),
        "truncated.jpg": Case(truncated_src[: len(truncated_src) // 2], stage="decode", reason="truncated"),
        "text.jpg": Case(b"this is a text file, not a photo\n", stage="decode", reason="not a supported image"),
        "cmyk.jpg": Case(cmyk_jpeg(), size=(24, 16)),
        "gray16.png": Case(gray16_png(), size=(8, 6)),
        "palette_transparent.png": Case(palette_transparent_png(), size=(10, 10)),
        "rgba.png": Case(rgba_png(), size=(12, 8)),
        "gray.jpg": Case(_save(Image.fromarray(_noise(30, 20, 3)[..., 0]), "JPEG"), size=(30, 20)),
        "exif_rotated.jpg": Case(exif_rotated_jpeg(64, 40), size=(40, 64)),
        "one_pixel.png": Case(_save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), stage="decode",
                              reason="too small for a 3x3 snippet grid"),
        # past 2x PIL's limit (PIL raises) and between 1x and 2x (PIL only warns): both error rows, nothing decoded
        "bomb.png": Case(png_header_only(100_000, 100_000), stage="decode", reason="decompression-bomb limit"),
        "bomb_1x.png": Case(png_header_only(10_000, 10_000), stage="decode", reason="decompression-bomb limit"),
        "animated.gif": Case(animated_gif(), size=(16, 12)),
        "multipage.tiff": Case(multipage_tiff(), size=(20, 10)),
        "good.jpg": Case(good, size=(48, 36)),
        f"{UNICODE_DIR}/{UNICODE_NAME}": Case(good, size=(48, 36)),
    }


def write_hostile_folder(root: Path) -> dict[str, Case]:
    """A folder dataset (no ground truth) holding every hostile case; returns ``{image_id: Case}``.

    Image ids of the folder reader are paths relative to the root, i.e. the keys of :func:`hostile_images`.
    """
    cases = hostile_images()
    for name, case in cases.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(case.data)
    return cases


def write_hostile_coco(root: Path, split: str = "train") -> dict[str, Case]:
    """A COCO dataset with every hostile case plus one image listed but absent; returns ``{image_id: Case}``.

    Every image gets annotation ``category_id`` 1 (``CLASSES[0]``).
    """
    cases = hostile_images()
    img_dir = root / split
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns, out = [], [], {}
    for n, (name, case) in enumerate(cases.items(), start=1):
        (img_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (img_dir / name).write_bytes(case.data)
        images.append({"id": n, "file_name": name, "width": 1, "height": 1})
        anns.append({"id": n, "image_id": n, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})
        out[str(n)] = case
    missing = len(cases) + 1
    images.append({"id": missing, "file_name": "listed but missing.jpg", "width": 1, "height": 1})
    out[str(missing)] = Case(b"", stage="read", reason="listed but missing.jpg")
    cats = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}, ensure_ascii=False), encoding="utf-8"
    )
    return out


def write_classes(path: Path) -> Path:
    path.write_text("\n".join(CLASSES) + "\n")
    return path
