"""Upright and small: the EXIF orientation of a decoded image and the final downscale, the last
steps of every path in `core.imageio` (8-bit, deep colour, TIFFs Pillow cannot open, in-memory
images).

The orientation is applied to the decoded pixels rather than left to the viewer: the model, the
stored copy and the screen must see the same upright cell. Decoders differ in who does it:
Pillow's TIFF reader turns the image while loading (and reports the turned size), the others
leave it to `oriented_fit`.
"""
from __future__ import annotations

from PIL import Image

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # EXIF orientation -> what displays it upright (as exif_transpose)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of `img`, 1 (upright) when absent, out of range or unreadable."""
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF is common and must not block the image
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) once the orientation tag is applied. Pillow's TIFF reader reports (and on
    load applies) the orientation itself; other readers report the stored size."""
    width, height = img.size
    return (height, width) if orientation in (5, 6, 7, 8) and img.format != "TIFF" else (width, height)


def oriented_fit(rgb: Image.Image, displayed: tuple[int, int], orientation: int, notes: list[str], max_side: int,
                 already: bool = False) -> tuple[Image.Image, tuple[int, int], list[str]]:
    """`rgb` turned upright (unless the decoder `already` did) and downscaled to `max_side`, with
    a note for each; returns (rgb, displayed full-resolution size, notes)."""
    if orientation in _TRANSPOSE:  # decoded from the stored layout (unless the decoder did it): orient it
        rgb = rgb if already else rgb.transpose(_TRANSPOSE[orientation])
        notes.append(f"rotated/flipped according to the EXIF orientation tag ({orientation})")
    # The copy still carries the file's EXIF / XMP (orientation included): whoever reads the tag
    # again (prepare_image, Pillow's exif_transpose) would turn the upright image a second time.
    rgb.info.clear()
    return _fit(rgb, displayed, notes, max_side)


def _fit(rgb: Image.Image, size: tuple[int, int], notes: list[str], max_side: int):
    """Downscale to max_side (with a note); returns (rgb, original size, notes)."""
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if rgb.size != size:
        notes.append(f"downscaled from {size[0]}x{size[1]} to {rgb.width}x{rgb.height}")
    return rgb, size, notes
