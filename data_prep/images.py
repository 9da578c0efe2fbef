"""Image mode handling shared by data prep (decode check) and the training loader (decode path).

``PIL.Image.convert("RGB")`` does not rescale high-bit-depth modes: a 16-bit greyscale PNG (mode
``I;16``/``I``, values 0..65535) is clipped to 0..255, so all but the darkest pixels turn white.
``to_rgb`` scales such images to 8 bits first.
"""

from __future__ import annotations

from typing import Any

_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S")


def to_rgb(im: Any) -> Any:
    """An 8-bit RGB copy of a PIL image, high-bit-depth modes scaled (not clipped) to 0..255.

    - ``I;16*`` (16-bit greyscale): ``v * 255 / 65535``.
    - ``I`` (32-bit integer; what 16-bit PNGs decode to in some Pillow versions): taken as 16-bit
      (0..65535) when every value fits, else scaled from its own min..max.
    - ``F`` (32-bit float): taken as 0..1 when every value fits, as 0..255 when those fit, else
      scaled from its own min..max.
    - Anything else: ``convert("RGB")`` (palette, alpha, CMYK, ... as Pillow does it).

    Raises ``ValueError`` for a mode Pillow cannot convert.
    """
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in _16BIT or mode in ("I", "F"):
        import numpy as np
        from PIL import Image

        a = np.asarray(im)
        if a.ndim != 2:
            raise ValueError(f"unsupported {mode} image with array shape {a.shape}")
        a = a.astype(np.float64)
        if a.size == 0:
            lo, hi = 0.0, 1.0
        else:
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if mode in _16BIT:
            lo, top = 0.0, 65535.0
        elif mode == "I":
            lo, top = (0.0, 65535.0) if lo >= 0 and hi <= 65535 else (lo, hi)
        else:  # F
            if lo >= 0 and hi <= 1.0:
                lo, top = 0.0, 1.0
            elif lo >= 0 and hi <= 255.0:
                lo, top = 0.0, 255.0
            else:
                top = hi
        scale = 255.0 / (top - lo) if top > lo else 0.0
        a8 = np.clip(np.rint((np.nan_to_num(a, nan=lo) - lo) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a8).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a {mode} image to RGB ({e})") from None
