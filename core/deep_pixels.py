"""Colour images with more than 8 bits per sample: scientific cameras and scanners' TIFF exports.

Pillow decodes a 16-bit colour PNG or TIFF into 8-bit RGB by keeping each sample's high byte.
A camera that fills 10-12 bits of its 16-bit container then comes out nearly black (a 12-bit
image's brightest pixel becomes 15 of 255) and the cell would be refused as a blank frame.
Pillow also cannot open planar ("one plane per colour") or floating-point colour TIFFs. Those
images are decoded here at full depth, with tifffile for TIFF and OpenCV for PNG (both come
with the pinned requirements), and stretched from their own range, as `core.imageio` does for
16-bit grayscale.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_BITS_PER_SAMPLE = 258  # TIFF tag


def is_tiff(data: bytes) -> bool:
    """Whether the bytes start like a TIFF file."""
    return data[:4] in TIFF_MAGIC


def is_deep_colour(img: Image.Image) -> bool:
    """True when Pillow opened (not yet decoded) a colour image stored with 16 bits per sample,
    which its decoder would cut to the high byte."""
    if img.mode not in ("RGB", "RGBA") or not img.tile:
        return False
    if img.format == "TIFF":  # the tag, not the raw mode: planar 16-bit files are read with 8-bit ones
        bits = img.tag_v2.get(_BITS_PER_SAMPLE, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    args = img.tile[0].args
    rawmode = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
    return ";16" in rawmode


def tiff_size(data: bytes) -> tuple[int, int]:
    """(width, height) of the first page, read from the header only."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages.first
        return int(page.imagewidth), int(page.imagelength)


def decode_deep(data: bytes, fmt: str) -> np.ndarray:
    """(H, W, 3) samples of the first page / frame at their stored depth and type."""
    if fmt == "TIFF":
        import tifffile

        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            array, axes = page.asarray(), page.axes
        if axes.startswith("S"):  # planar: samples first
            array = np.moveaxis(array, 0, -1)
    else:
        import cv2

        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError("OpenCV could not decode the image")
        if array.ndim == 3:
            array = array[..., [2, 1, 0]]  # OpenCV's BGR(A) to RGB; alpha dropped below
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"unexpected sample layout {array.shape}")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]


def stretch_to_uint8(array: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Samples stretched from their own finite min-max range to 0-255; returns (uint8, lo, hi).
    One range for all channels, so the colour balance is kept."""
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        array = np.where(finite, array, np.nan)  # NaN/inf pixels must not set the range
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))  # NaN only if all are NaN
    if not (np.isfinite(lo) and np.isfinite(hi)):
        lo = hi = 0.0
    out = np.subtract(array, lo, dtype=np.float32)  # float32: half the memory of float64
    out *= (255.0 / (hi - lo)) if hi > lo else 0.0  # a flat image has nothing to stretch
    np.nan_to_num(out, copy=False, nan=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), lo, hi


def deep_to_rgb(array: np.ndarray, label: str) -> tuple[Image.Image, list[str]]:
    """8-bit RGB image and a note from `decode_deep`'s samples (8-bit samples are kept as they are)."""
    if array.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(array)), []
    stretched, lo, hi = stretch_to_uint8(array)
    depth = "floating-point" if array.dtype.kind == "f" else f"{array.dtype.itemsize * 8}-bit"
    return Image.fromarray(stretched), [f"{depth} colour {label} converted to 8-bit by stretching its own "
                                        f"range {lo:g}-{hi:g} to 0-255"]


def deep_grey_to_rgb(img: Image.Image, label: str) -> tuple[Image.Image, list[str]]:
    """A decoded 16-bit / 32-bit / float grey Pillow image stretched to 8-bit RGB, with a note."""
    grey, lo, hi = stretch_to_uint8(np.asarray(img))
    if img.mode == "F":
        depth = "floating-point"
    elif img.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
        depth = "16-bit"
    else:
        depth = "32-bit integer"
    note = f"{depth} {label} converted to 8-bit by stretching its own range {lo:g}-{hi:g} to 0-255"
    return Image.fromarray(grey).convert("RGB"), [note]
