"""Images of every PIL mode -> the 8-bit RGB image the processors expect, or a reason to skip.

`convert("RGB")` alone is wrong for some modes: 16-bit greyscale (`I;16`) is clipped at 255, so a
normal photo turns solid white, and transparent pixels keep whatever colour they hide. What each mode
becomes (docs/faults.md, "Image modes"):

- RGB: unchanged. 1, L, RGBX, CMYK, YCbCr, LAB, HSV: PIL's conversion to RGB.
- I;16, I;16L, I;16B, I;16N (16-bit greyscale), and I read from a 16-bit PNG or TIFF (older Pillow
  opens 16-bit PNGs as I): scaled to 8 bits (value / 257, rounded), then grey RGB.
- Alpha (RGBA, RGBa, LA, La, PA, and P with a transparent colour): composited over white, as
  transformers' `convert_to_rgb` does; premultiplied modes are un-premultiplied first.
- P (palette) without transparency: its palette's colours.
- Other I and F (32-bit integer and float greyscale) have no nominal range, and any other mode is unknown:
  the sample is skipped with reason `unsupported_image_mode`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mmflow.errors import ImageModeError

PLAIN = frozenset({"1", "L", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
ALPHA = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
WHITE = (255, 255, 255, 255)


def _sixteen_bit_file(image: Image.Image) -> bool:
    """An `I` image that is 16-bit in its file: a PNG (older Pillow opens 16-bit grey PNGs as `I`) or a
    TIFF with 16 bits per sample."""
    if image.format == "PNG":
        return True
    bits = getattr(image, "tag_v2", {}).get(258) if image.format == "TIFF" else None
    return tuple(bits or ()) == (16,)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, converted as the module docstring says; ImageModeError when it cannot be."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in SIXTEEN_BIT or (mode == "I" and _sixteen_bit_file(image)):
        values = np.asarray(image, dtype=np.float64)  # 0..65535 in any byte order
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in ALPHA:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")  # PIL: La only to LA
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    if mode in PLAIN or mode == "P":
        return image.convert("RGB")
    why = {
        "I": "32-bit integer greyscale has no nominal range",
        "F": "32-bit float greyscale has no nominal range",
    }.get(mode, "PIL mode mmflow has no faithful RGB conversion for")
    raise ImageModeError(f"image mode {mode!r}: {why}; save it as 8- or 16-bit (L, I;16) or RGB")
