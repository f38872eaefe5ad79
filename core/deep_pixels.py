"""Colour images with more than 8 bits per sample: scientific cameras and scanners' TIFF exports.

Pillow decodes a 16-bit colour PNG or TIFF into 8-bit RGB by keeping each sample's high byte.
A camera that fills 10-12 bits of its 16-bit container then comes out nearly black (a 12-bit
image's brightest pixel becomes 15 of 255) and the cell would be refused as a blank frame.
Pillow also cannot open planar ("one plane per colour"), floating-point or 16-bit grey+alpha
TIFFs. Those images are decoded here at full depth, with tifffile (OpenCV when tifffile lacks the
codec, e.g. LZW) for TIFF and OpenCV for PNG, both in the pinned requirements, and stretched from
their own range, as `core.imageio` does for 16-bit grayscale. Alpha is composited over white.

Memory: the header is checked before any pixel is decoded (at most 4 samples per pixel, one
plane, and no more bytes than `max_pixels` 16-bit RGB pixels would take), and a large image is
subsampled to twice the display size before the float copy that stretching needs.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_BITS_PER_SAMPLE, _ORIENTATION = 258, 274  # TIFF tags
_BYTES_PER_PIXEL_LIMIT = 6  # 16-bit RGB: what `max_pixels` allows a deep image to decode into


class DeepImageRefused(ValueError):
    """The file's header asks for a decode this module refuses; the message says why."""


def is_tiff(data: bytes) -> bool:
    """Whether the bytes start like a TIFF file."""
    return data[:4] in TIFF_MAGIC


def is_deep_colour(img: Image.Image) -> bool:
    """True when Pillow opened (not yet decoded) a colour or grey+alpha image stored with 16 bits
    per sample, which its decoder would cut to the high byte."""
    if img.mode not in ("RGB", "RGBA", "LA") or not img.tile:
        return False
    if img.format == "TIFF":  # the tag, not the raw mode: planar 16-bit files are read with 8-bit ones
        bits = img.tag_v2.get(_BITS_PER_SAMPLE, (8,))
        return max(bits if isinstance(bits, tuple) else (bits,)) > 8
    args = img.tile[0].args
    rawmode = args if isinstance(args, str) else next((a for a in args or () if isinstance(a, str)), "")
    return ";16" in rawmode


@dataclass(frozen=True)
class TiffInfo:
    """What a TIFF's first page header says, read before decoding its pixels."""
    width: int  # as stored, before the orientation tag is applied
    height: int
    pages: int
    orientation: int  # TIFF/EXIF orientation tag, 1 when absent
    alpha: bool  # the extra sample is alpha (associated or unassociated), not an unspecified channel


def tiff_header(data: bytes, max_pixels: int) -> TiffInfo:
    """The first page's layout from the header; DeepImageRefused when decoding it would take more
    memory than `max_pixels` allows (whole image, or one tile: tifffile decodes whole tiles)."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        page = tiff.pages.first
        if page.samplesperpixel > 4 or page.imagedepth > 1:
            raise DeepImageRefused(f"the TIFF stores {page.samplesperpixel} samples per pixel in "
                                   f"{page.imagedepth} planes; only grey, RGB and their alpha are read")
        bytes_per_pixel = page.samplesperpixel * max(1, math.ceil(max(_as_tuple(page.bitspersample)) / 8))
        tile = page.tilewidth * page.tilelength * max(1, page.tiledepth) if page.is_tiled else 0
        largest = max(page.imagewidth * page.imagelength, tile) * bytes_per_pixel
        if largest > max_pixels * _BYTES_PER_PIXEL_LIMIT:
            raise DeepImageRefused(f"the TIFF's first page would decode to {largest / 1e9:.1f} GB; "
                                   "refused as a possible decompression bomb")
        orientation = page.tags.valueof(_ORIENTATION, 1)
        alpha = bool(page.extrasamples) and int(page.extrasamples[0]) in (1, 2)
        return TiffInfo(int(page.imagewidth), int(page.imagelength), len(tiff.pages),
                        int(orientation) if orientation in range(1, 9) else 1, alpha)


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def decode_deep(data: bytes, fmt: str, keep_extra: bool = True) -> tuple[np.ndarray, bool]:
    """((H, W, C) samples of the first page / frame at their stored depth and type, C in 1-4: grey,
    grey+alpha, RGB, RGBA; whether the decoder already applied the orientation tag). `keep_extra`
    False drops a TIFF's 2nd / 4th sample (not alpha). Call `tiff_header` first for a TIFF."""
    array = _read_tiff(data) if fmt == "TIFF" else None
    oriented = False
    if array is None:  # PNG, or a TIFF codec tifffile lacks: OpenCV's libpng / libtiff
        import cv2

        # Its failures print C++ log lines on stderr; the caller's ImageRejected says it instead.
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError("the image could not be decoded")
        if array.ndim == 3 and array.shape[-1] in (3, 4):  # OpenCV's BGR(A) to RGB(A)
            array = array[..., 2::-1] if array.shape[-1] == 3 else array[..., [2, 1, 0, 3]]
        if array.ndim == 3 and array.shape[-1] == 4 and _png_colour_type(data) == 4:
            array = array[..., [0, 3]]  # OpenCV widens grey+alpha to RGBA: keep it grey+alpha
        oriented = fmt == "TIFF"  # OpenCV's TIFF reader applies the orientation tag itself
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or not 1 <= array.shape[-1] <= 4:
        raise ValueError(f"unexpected sample layout {array.shape}")
    if not keep_extra and array.shape[-1] in (2, 4):
        array = array[..., :-1]
    return array, oriented


def _png_colour_type(data: bytes) -> int | None:
    """The colour type in a PNG's header (0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 25:
        return data[25]
    return None


def _read_tiff(data: bytes) -> np.ndarray | None:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages.first
            array, axes = page.asarray(), page.axes
    except ValueError as error:
        if "imagecodecs" in str(error):  # e.g. LZW: tifffile's optional codecs are not installed
            return None
        raise
    return np.moveaxis(array, 0, -1) if axes.startswith("S") else array  # planar: samples first


def stretch_to_uint8(array: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Samples stretched from their own finite min-max range (over `mask` pixels when given) to
    0-255; returns (uint8, lo, hi). One range for all channels, so the colour balance is kept."""
    finite = np.isfinite(array) if array.dtype.kind == "f" else None
    if finite is not None and not finite.all():
        array = np.where(finite, array, np.nan)  # NaN/inf pixels must not set the range
    sample = array[mask] if mask is not None and mask.any() else array
    lo, hi = float(np.nanmin(sample)), float(np.nanmax(sample))  # NaN only if all are NaN
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo = hi = 0.0
    out = np.subtract(array, lo, dtype=np.float32)  # float32: half the memory of float64
    out *= (255.0 / (hi - lo)) if hi > lo else 0.0  # a flat image has nothing to stretch
    np.nan_to_num(out, copy=False, nan=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), lo, hi


def deep_to_rgb(array: np.ndarray, label: str, max_side: int) -> tuple[Image.Image, list[str]]:
    """8-bit RGB image and notes from `decode_deep`'s samples: block-averaged to about 2x `max_side`,
    stretched from the range of its opaque pixels, alpha composited over white (8-bit samples
    are kept as they are)."""
    array = _average_blocks(array, max(1, max(array.shape[:2]) // (2 * max_side)))
    colour, alpha = (array[..., :-1], array[..., -1]) if array.shape[-1] in (2, 4) else (array, None)
    opacity = None if alpha is None else _opacity(alpha)
    notes = []
    if array.dtype == np.uint8:
        rgb = colour
    else:
        rgb, lo, hi = stretch_to_uint8(colour, None if opacity is None else opacity[..., 0] > 0)
        depth = "floating-point" if array.dtype.kind == "f" else f"{array.dtype.itemsize * 8}-bit"
        kind = "colour" if colour.shape[-1] == 3 else "grey"
        notes.append(f"{depth} {kind} {label} converted to 8-bit by stretching its own range {lo:g}-{hi:g} to 0-255")
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    if opacity is not None and (opacity < 1).any():
        # The model never saw transparency; white matches the slide background.
        rgb = np.rint(rgb * opacity + 255.0 * (1 - opacity)).astype(np.uint8)
        notes.append("transparent areas composited over a white background")
    return Image.fromarray(np.ascontiguousarray(rgb)), notes


def _average_blocks(array: np.ndarray, step: int) -> np.ndarray:
    """(H, W, C) shrunk `step` times by averaging step x step blocks, same sample type.
    Averaging, not keeping every step-th pixel: a pattern finer than the step (granules,
    a sensor's mosaic) must come out as its mean, not as whichever phase the stride hits.
    Float samples average their finite values (a NaN pixel must not blank its block). Done in
    strips of rows, so the extra memory stays a few tens of MB whatever the image's size."""
    if step == 1:
        return array
    rows, cols, channels = array.shape[0] // step, array.shape[1] // step, array.shape[-1]
    out = np.empty((rows, cols, channels), dtype=np.float32)  # exact enough for means of 16-bit samples
    strip = max(1, (1 << 21) // max(1, cols * step * step * channels))  # block rows per ~2M samples
    for top in range(0, rows, strip):
        bottom = min(rows, top + strip)
        blocks = array[top * step:bottom * step, :cols * step].reshape(bottom - top, step, cols, step, channels)
        if array.dtype.kind == "f":
            finite = np.isfinite(blocks)
            total = np.where(finite, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[top:bottom] = total / finite.sum(axis=(1, 3))  # no finite sample: NaN
        else:
            out[top:bottom] = blocks.mean(axis=(1, 3), dtype=np.float64)
    return out.astype(array.dtype, copy=False) if array.dtype.kind == "f" else np.rint(out, out=out).astype(array.dtype)


def _opacity(alpha: np.ndarray) -> np.ndarray:
    """(H, W, 1) opacity in [0, 1] from an alpha channel of any sample type."""
    if alpha.dtype.kind in "ui":
        scaled = alpha.astype(np.float32) / np.iinfo(alpha.dtype).max
    else:
        scaled = np.nan_to_num(alpha.astype(np.float32), nan=1.0)
    return np.clip(scaled, 0, 1)[..., None]


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
