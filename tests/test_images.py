"""cdul_ray.images.decode_image on every hostile case: exact sizes, modes and pixel values, or the error's words."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from cdul_ray.images import BACKGROUND, ImageDecodeError, decode_image
from tests import hostile


def _px(im: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    return tuple(int(v) for v in im.getpixel(xy))


@pytest.mark.parametrize("name", [n for n, c in hostile.hostile_images().items() if c.size is not None])
def test_every_labelable_case_decodes_to_rgb_of_its_upright_size(name):
    case = hostile.hostile_images()[name]
    im = decode_image(case.data)
    assert im.mode == "RGB" and im.size == case.size
    assert np.asarray(im).shape == (case.size[1], case.size[0], 3)


@pytest.mark.parametrize("name,reason", [
    ("zero_byte.jpg", "empty file (0 bytes)"),
    ("truncated.jpg", "truncated or corrupt JPEG image data"),
    ("text.jpg", "not a supported image (JPEG, PNG, GIF, TIFF, BMP, WEBP); 33 bytes starting b'this is a text f'"),
    ("bomb.png", "decompression-bomb limit"),
    ("bomb_1x.png", "image of 10000x10000 = 100000000 pixels exceeds the decompression-bomb limit of 89478485"),
])
def test_unusable_files_raise_a_readable_reason(name, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(hostile.hostile_images()[name].data)
    assert reason in str(info.value)


def test_exif_orientation_is_applied():
    im = decode_image(hostile.exif_rotated_jpeg(64, 40))
    assert im.size == (40, 64)  # stored 64x40 landscape, orientation 6 -> portrait
    # stored left half red -> after a 90° clockwise rotation it is the top half
    top, bottom = np.asarray(im)[5, 20].astype(int), np.asarray(im)[58, 20].astype(int)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    im = decode_image(hostile.gray16_png())
    arr = np.asarray(im)
    assert arr.dtype == np.uint8
    # row r stores r * 13107 of 65535 -> r * 51 of 255 (PIL's convert("RGB") would give 0, 255, 255, ...)
    np.testing.assert_array_equal(arr[:, 0, 0], [0, 51, 102, 153, 204, 255])
    assert (arr == arr[:, :1, :1]).all()  # grey: R = G = B, constant along rows


def test_transparency_is_composited_on_white():
    assert BACKGROUND == (255, 255, 255)
    pal = decode_image(hostile.palette_transparent_png())
    assert _px(pal, (0, 0)) == (255, 255, 255)  # transparent index (stored green) -> background
    assert _px(pal, (9, 9)) == (255, 0, 0)
    rgba = decode_image(hostile.rgba_png())
    assert _px(rgba, (0, 0)) == (255, 255, 255)  # alpha 0 blue -> background
    r, g, b = _px(rgba, (11, 7))  # red at alpha 128 over white: (255, 127, 127) up to rounding
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_cmyk_and_grayscale_become_rgb():
    cyan = _px(decode_image(hostile.cmyk_jpeg()), (12, 8))
    assert cyan[0] < 20 and cyan[1] > 235 and cyan[2] > 235  # C=255 -> R=0, G=B=255 (JPEG-rounded)
    gray = np.asarray(decode_image(hostile.hostile_images()["gray.jpg"].data))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_multi_frame_files_give_their_first_frame():
    gif = decode_image(hostile.animated_gif())
    assert gif.size == (16, 12) and _px(gif, (8, 6)) == (255, 0, 0)
    tiff = decode_image(hostile.multipage_tiff())
    assert tiff.size == (20, 10) and _px(tiff, (3, 3)) == (0, 255, 0)


def test_one_pixel_image_decodes_its_only_pixel():
    im = decode_image(hostile.hostile_images()["one_pixel.png"].data)
    assert im.size == (1, 1) and _px(im, (0, 0)) == (9, 9, 9)


def test_bomb_header_is_refused_before_any_pixel_is_decoded():
    # The files hold an empty pixel stream: had the decoder loaded them, it would fail with "truncated or corrupt"
    # (after allocating 9.3 GiB / 95 MiB); the size check on the header must come first.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes either
        for w, h in ((100_000, 100_000), (10_000, 10_000)):
            with pytest.raises(ImageDecodeError) as info:
                decode_image(hostile.png_header_only(w, h))
            assert "decompression-bomb limit" in str(info.value) and "truncated" not in str(info.value)
    with pytest.raises(ImageDecodeError, match="truncated or corrupt PNG"):  # the same file under the limit
        decode_image(hostile.png_header_only(100, 100))


def test_limit_is_a_parameter_and_follows_pil():
    data = hostile.hostile_images()["good.jpg"].data  # 48x36 = 1728 pixels
    with pytest.raises(ImageDecodeError, match="48x36 = 1728 pixels exceeds the decompression-bomb limit of 1000"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=1728).size == (48, 36)


def test_other_formats_are_not_parsed():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # PIL's EPS plugin would run Ghostscript
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(eps)
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    with pytest.raises(ImageDecodeError, match="not a supported image"):
        decode_image(ico.getvalue())


def test_float_images_are_refused():
    tif = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tif, "TIFF")
    with pytest.raises(ImageDecodeError, match="mode F"):
        decode_image(tif.getvalue())
