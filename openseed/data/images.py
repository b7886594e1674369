"""One way to turn a decoded picture into the uint8 RGB array that openseed trains and predicts on.

Used by the shard converters (``openseed.data.shards``) and by ``openseed.predict.load_image``, so that a picture is
read the same way in both. Rules (``rgb_array``):

- EXIF orientation (tag 0x0112, values 2-8) is applied, so a phone photo comes out upright as the camera meant it;
  an absent or invalid tag means "as stored". Pass ``orient=False`` to keep the stored pixel order.
- 8-bit modes (1, L, P, RGB, CMYK, YCbCr, ...) are converted by PIL; alpha (LA, PA, RGBA) is dropped, not composited.
- 16-bit integer data (I;16, I;16B, I;16L, and mode I, which PIL uses for 16-bit PNG and TIFF) keeps its high byte:
  ``value >> 8`` (0..65535 -> 0..255, proportional, never clipped). Mode I values outside 0..65535 are refused.
- Float data (mode F) in [0, 1] is scaled by 255 and rounded; other float data (outside [0, 1], NaN, inf) is
  refused: there is no single right way to map it to 8 bits.

A refused picture raises ``ValueError`` saying why; callers add the file name.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EIGHT_BIT = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LA", "La", "PA", "RGBA", "RGBa"}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation tag (1..8); 1 (as stored) when absent, unreadable or out of range."""
    try:
        value = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a readable picture unreadable
        return 1
    return value if value in _UPRIGHT else 1


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of a picture of stored ``size`` once its EXIF ``orientation`` is applied."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else tuple(size)


def _to_uint8_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _EIGHT_BIT:
        return np.asarray(image.convert("RGB"))
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (int32)
        values = np.asarray(image)
        if values.dtype.kind not in "iu":
            raise ValueError(f"unsupported integer image mode {mode!r}")
        if values.size and (int(values.min()) < 0 or int(values.max()) > 65535):
            raise ValueError(f"{mode} image with values {int(values.min())}..{int(values.max())} outside 0..65535: "
                             "convert it to 8 or 16 bits first")
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError("float (mode F) image with values outside [0, 1] or not finite: no rule maps it to "
                             "8 bits; convert it first")
        gray = np.rint(values * 255.0).astype(np.uint8)
    else:
        try:
            return np.asarray(image.convert("RGB"))
        except ValueError as err:
            raise ValueError(f"unsupported image mode {mode!r} ({err})") from err
    return np.repeat(gray[..., None], 3, axis=2)


def rgb_array(image: Image.Image, orient: bool = True) -> np.ndarray:
    """A PIL image of any common mode -> uint8 [H, W, 3] RGB, upright per its EXIF orientation unless ``orient`` is
    False (see the module docstring for the rules). Raises ``ValueError`` for data that has no clear 8-bit form."""
    image.load()
    transpose = _UPRIGHT.get(exif_orientation(image)) if orient else None
    if transpose is not None:
        image = image.transpose(transpose)
    return np.ascontiguousarray(_to_uint8_rgb(image))
