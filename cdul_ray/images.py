"""Bytes -> an upright 8-bit RGB image, or a clear error: the one image decoder of labeling, training and prediction.

Pure PIL/numpy (no Ray). What it does with the images real corpora hold:

- **Formats**: only JPEG (MPO, the multi-picture JPEG of phone cameras, included), PNG, GIF, TIFF, BMP and WebP are
  opened (``Image.open(formats=...)``); anything else, including a text file named ``.jpg`` and formats whose PIL
  plugin runs external programs (EPS), is refused without being parsed.
- **Orientation**: the EXIF orientation tag is applied (``PIL.ImageOps.exif_transpose``), so a phone photo stored
  sideways comes out upright and its width/height are the upright ones.
- **Decompression bombs**: the size in the header is checked against ``PIL.Image.MAX_IMAGE_PIXELS`` *before* any
  pixel is decoded. PIL itself only warns between 1x and 2x the limit and raises past 2x; both end here as
  :class:`ImageDecodeError`, so a 10⁹-pixel PNG of a few KiB never allocates its pixels.
- **Truncated files** are errors: PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left off (a half-grey image labeled
  as if it were the photo would be a silent wrong answer).
- **Several frames** (animated GIF/WebP/PNG, multi-page TIFF): the first frame.
- **Modes**: CMYK, YCbCr, palette, grayscale (``L``, ``1``) -> RGB through PIL; 16-bit grayscale (``I;16*`` and
  ``I``, as 16-bit PNG/TIFF decode) is scaled to 8 bit by ``round(v * 255 / 65535)`` (PIL's own ``convert`` would
  clip every value above 255 to white); float images (``F``) are refused. Images with transparency (``RGBA``,
  ``LA``, ``PA``, palette + ``transparency``) are alpha-composited onto :data:`BACKGROUND`, opaque white, the
  convention of web image pipelines; fully transparent pixels therefore become white whatever colour they store.

Size limits of the consumers (the K×K snippet grid needs >= K pixels per side) are theirs to check: a 1×1 image
decodes here and is refused by ``cdul_ray.core.alignment.snippet_boxes`` in the labeling job.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats opened at all (PIL format names); see the module docstring.
FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP")  # PIL's JPEG opener also yields MPO

# Opaque white: what transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why in words (empty, not an image, truncated, too large)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode an encoded image into an upright 8-bit RGB image (first frame, EXIF orientation applied).

    Args:
        data: The file's bytes.
        max_pixels: Refuse images with more pixels than this (width × height of the header), before decoding them.
            Default: ``PIL.Image.MAX_IMAGE_PIXELS`` at call time (89,478,485 unless changed; ``None`` there means no
            limit).

    Returns:
        A loaded ``RGB`` image, independent of ``data``; ``width``/``height`` are the upright size in pixels.

    Raises:
        ImageDecodeError: empty data, not one of :data:`FORMATS`, more than ``max_pixels`` pixels, truncated or
            corrupt pixel data, a float (``F``) image, or a mode PIL cannot convert to RGB.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit; the explicit check below turns that range into an error too
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression-bomb limit: {e}; not decoded") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError(
            f"not a supported image ({', '.join(FORMATS)}); {len(data)} bytes starting {data[:16]!r}"
        ) from e
    except (OSError, ValueError, SyntaxError) as e:  # a recognised header that PIL cannot parse
        raise ImageDecodeError(f"corrupt image header: {e}") from e
    with im:
        width, height = im.size
        if limit is not None and width * height > limit:
            raise ImageDecodeError(
                f"image of {width}x{height} = {width * height} pixels exceeds the decompression-bomb limit of "
                f"{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS); not decoded"
            )
        try:
            im.load()  # first frame only
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageDecodeError(f"truncated or corrupt {im.format} image data ({len(data)} bytes): {e}") from e
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception as e:  # a broken EXIF block: refuse rather than label a possibly sideways photo
            raise ImageDecodeError(f"unreadable EXIF orientation in {im.format} image: {e}") from e
        return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, as described in the module docstring (alpha onto :data:`BACKGROUND`).

    Raises:
        ImageDecodeError: float (``F``) images, or a mode PIL cannot convert.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "F":
        raise ImageDecodeError("32-bit float image (mode F) has no defined 8-bit scale; not supported")
    if mode in _SIXTEEN_BIT_MODES:
        v = np.asarray(image).astype(np.float64)  # (H, W) 0..65535
        v = np.rint(np.clip(v, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(v, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"cannot convert a mode {mode} image to RGB: {e}") from e
