"""Safe loading of uploaded microscopy images.

Every upload goes through `load_image_bytes`, which either returns a small RGB image ready
for the model or raises `ImageRejected` whose message is a sentence a clinician can read.
No other exception escapes: Pillow raises OSError, SyntaxError, ValueError, EOFError,
struct.error ... on hostile or damaged files, and all of them become `ImageRejected`.

Decisions worth knowing:
* The decoder is chosen from the content, never from the extension; only formats in
  `ALLOWED_FORMATS` are decoded (MPO is how Pillow names many phone JPEGs).
* The pixel count declared in the header is checked against ``max_pixels`` before any
  pixel data is decoded. Pillow's own `Image.MAX_IMAGE_PIXELS` guard stays as an outer
  check (its warning is turned into a refusal) and is raised to ``max_pixels`` when that is
  higher, so the setting, not Pillow's default of about 89 million, is the limit.
* 16-bit, 32-bit and float images, grey or colour, are contrast-stretched from their own
  min-max range, not from the dtype range: microscopy cameras often fill only 10-14 bits of a
  16-bit container, and dividing by 65535 would give an almost black picture. Colour ones are
  decoded at full depth in `core.deep_pixels` (Pillow would keep only their high byte).
* ``original_size`` is the full-resolution size as displayed, i.e. after EXIF rotation
  (`core.orientation`).
"""
from __future__ import annotations

import hashlib
import io
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from . import deep_pixels
from .orientation import displayed_size, exif_orientation, oriented_fit
from .upload_checks import (  # noqa: F401  (ImageRejected is this module's public error too)
    SUPPORTED_TEXT, ImageRejected, check_dimensions, check_raw_bytes, check_size, fit_size, safe_name, short_reason,
    upload_limits,
)

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "GIF", "WEBP"})
# Extension -> the format it promises; only used to write a note, never to pick a decoder.
_EXTENSIONS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF",
    ".webp": "WEBP",
}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Default decode limits, the Describe page's: the longer side is shrunk to MAX_SIDE and a side
# under MIN_SIDE is refused, so a strip may be at most MAX_SIDE / MIN_SIDE times the other side.
# The atlas index records them (core.gallery): what it loaded under other limits is loaded again.
MAX_SIDE = 1024
MIN_SIDE = 16


@dataclass(frozen=True)
class LoadedImage:
    """An accepted image, decoded to 8-bit RGB, with what is stored about its original file."""
    image: Image.Image  # RGB, 8-bit, orientation applied, longest side <= max_side
    sha256: str  # of the original bytes, so identical uploads share one stored copy
    file_name: str  # sanitised basename, for display only
    n_bytes: int
    original_size: tuple[int, int]  # (width, height) at full resolution, after rotation
    notes: tuple[str, ...]  # what was done to the image, in plain words


def load_image_bytes(data: bytes, file_name: str, *, max_bytes: int | None = None,
                     max_pixels: int | None = None, max_side: int = MAX_SIDE,
                     min_side: int = MIN_SIDE) -> LoadedImage:
    """Validate and decode an uploaded image into a small RGB `LoadedImage`.

    ``max_bytes`` and ``max_pixels`` default to the settings (HEMASCRIBE_MAX_UPLOAD_MB,
    HEMASCRIBE_MAX_PIXELS). Raises `ImageRejected` for anything that cannot be shown.
    """
    name = safe_name(file_name)
    max_bytes, max_pixels = upload_limits(max_bytes, max_pixels)
    data = bytes(data)  # accept bytearray / memoryview from upload widgets
    check_raw_bytes(data, name, max_bytes)
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses at open, before our header check, above its own ceiling: a setting asking
        # for more raises that ceiling for this process (never lowered; every image we open is
        # checked against the setting right after)
        Image.MAX_IMAGE_PIXELS = max_pixels
    with _decoding(name):
        image, original_size, notes = _decode(data, name, max_pixels, max_side, min_side)
    return LoadedImage(image=image, sha256=hashlib.sha256(data).hexdigest(),
                       file_name=name, n_bytes=len(data), original_size=original_size,
                       notes=tuple(notes))


def prepare_image(img: Image.Image, *, max_pixels: int | None = None, max_side: int = MAX_SIDE,
                  min_side: int = MIN_SIDE) -> tuple[Image.Image, list[str]]:
    """An in-memory PIL image made what `load_image_bytes` makes of a file: the same size
    checks, first frame, EXIF orientation, 8-bit RGB (alpha over white, 16-bit / float grey
    stretched) and downscale; returns (rgb, notes). For callers of the describe API who open
    images themselves: an EXIF orientation tag still in the image is applied (turn images with
    `ImageOps.exif_transpose`, never by hand). Raises `ImageRejected`."""
    _, max_pixels = upload_limits(None, max_pixels)
    name = "image"
    check_dimensions(name, *img.size, max_pixels, min_side, max_side)
    # Image.open(...).convert("RGB") or .copy() keep the file's EXIF and are not upright yet, so the
    # tag is always applied; a caller who turns an image by hand should use ImageOps.exif_transpose,
    # which also removes the tag (the loader's own output carries none)
    orientation = exif_orientation(img)
    if img.mode == "RGB" and orientation == 1 and max(img.size) <= max_side and getattr(img, "n_frames", 1) == 1:
        return img, []  # already what the loader makes (the app's and CLI's images): no copy
    with _decoding(name):
        label = img.format or "image"
        notes = _select_first_frame(img, img.format or "", label)
        rgb, mode_notes = _to_rgb(img, label)
        rgb, _, notes = oriented_fit(rgb, displayed_size(img, orientation), orientation, notes + mode_notes,
                                     max_side, already=img.format == "TIFF")
    return rgb, notes


@contextmanager
def _decoding(name: str):
    """Every decoder failure as one `ImageRejected` sentence about `name`. Also silences
    Pillow's chatter (e.g. odd EXIF) and makes its decompression-bomb warning a hard error
    instead of a printed line (the filter is process-global before Python 3.14; our own
    max_pixels check does not rely on it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageRejected:
        raise
    except deep_pixels.DeepImageRefused as exc:
        raise ImageRejected(f"{name}: {exc}.") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"{name}: the image declares more pixels than can be decoded "
                            f"safely (Pillow's limit is {Image.MAX_IMAGE_PIXELS:,}); refused "
                            f"as a possible decompression bomb.") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(f"{name}: the file is not a recognisable image (it may be "
                            f"damaged, or not a picture at all).") from exc
    except MemoryError as exc:
        raise ImageRejected(f"{name}: the image is too large to decode in the "
                            f"available memory.") from exc
    except Exception as exc:  # any decoder failure on damaged data, whatever its type
        raise ImageRejected(f"{name}: the image data is truncated or corrupted and could "
                            f"not be decoded ({short_reason(exc)}).") from exc


def load_image_path(path, *, max_bytes: int | None = None, max_pixels: int | None = None,
                    max_side: int = MAX_SIDE, min_side: int = MIN_SIDE) -> LoadedImage:
    """Read an image file and load it with `load_image_bytes`.

    The size is checked with stat() before reading, so an oversized file is refused
    without being read into memory.
    """
    path = Path(path)
    name = safe_name(path.name)
    max_bytes, max_pixels = upload_limits(max_bytes, max_pixels)
    try:
        if path.is_dir():
            raise ImageRejected(f"{name}: this is a folder, not an image file.")
        if not path.is_file():
            raise ImageRejected(f"{name}: the file does not exist or is not a regular file.")
        check_size(path.stat().st_size, name, max_bytes)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # +1: notice a file that grew after stat()
    except OSError as exc:
        raise ImageRejected(f"{name}: the file could not be read "
                            f"({exc.strerror or short_reason(exc)}).") from exc
    return load_image_bytes(data, path.name, max_bytes=max_bytes, max_pixels=max_pixels,
                            max_side=max_side, min_side=min_side)


def _decode(data: bytes, name: str, max_pixels: int, max_side: int, min_side: int):
    """Header checks, then a full decode of the first frame; returns (rgb, size, notes)."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not deep_pixels.is_tiff(data):
            raise
        return _decode_tiff_pillow_cannot_open(data, name, max_pixels, max_side, min_side)
    fmt = img.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(f"{name}: {fmt} images are not supported; use {SUPPORTED_TEXT}.")
    label = "JPEG" if fmt == "MPO" else fmt
    width, height = img.size
    check_dimensions(name, width, height, max_pixels, min_side, max_side)
    if fmt in ("PNG", "TIFF") and deep_pixels.is_deep_colour(img):
        return _decode_deep(data, img, name, label, max_pixels, max_side)
    if fmt == "PNG":
        # Pillow does not check IDAT checksums while decoding, so a damaged PNG can
        # decode to garbage; verify() checks every chunk's CRC (on a second handle,
        # because verify() leaves its image unusable).
        Image.open(io.BytesIO(data)).verify()
    notes = _extension_notes(name, label) + _select_first_frame(img, fmt, label)
    orientation = exif_orientation(img)
    displayed = displayed_size(img, orientation)  # before draft() shrinks the JPEG
    if label == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 6000x6000 photo never needs
        # to exist at full size in memory. draft() keeps both sides >= the target.
        img.draft(img.mode, fit_size((width, height), max_side))
    img.load()  # force the full decode now, so truncated data fails here
    rgb, mode_notes = _to_rgb(img, label)
    # Pillow's TIFF reader applied the orientation on load; other readers leave it to oriented_fit.
    return oriented_fit(rgb, displayed, orientation, notes + mode_notes, max_side, already=fmt == "TIFF")


def _decode_deep(data: bytes, img: Image.Image, name: str, label: str, max_pixels: int, max_side: int):
    """16-bit colour PNG / TIFF that Pillow opened (see core.deep_pixels): same checks, notes,
    orientation and result as the 8-bit path."""
    info = deep_pixels.tiff_header(data, max_pixels) if label == "TIFF" else None  # before decoding
    notes = _extension_notes(name, label) + _select_first_frame(img, img.format, label)
    array, oriented = deep_pixels.decode_deep(data, label, keep_extra=info is None or info.alpha)
    rgb, depth_notes = deep_pixels.deep_to_rgb(array, label, max_side)
    orientation = info.orientation if info else exif_orientation(img)
    return oriented_fit(rgb, displayed_size(img, orientation), orientation, notes + depth_notes, max_side,
                        already=oriented)


def _decode_tiff_pillow_cannot_open(data: bytes, name: str, max_pixels: int, max_side: int, min_side: int):
    """Planar, floating-point colour or 16-bit grey+alpha TIFFs (see core.deep_pixels), same checks
    and result."""
    info = deep_pixels.tiff_header(data, max_pixels)
    check_dimensions(name, info.width, info.height, max_pixels, min_side, max_side)
    notes = _extension_notes(name, "TIFF")
    if info.pages > 1:
        notes.append(f"multi-page TIFF: first of {info.pages} frames used")
    array, oriented = deep_pixels.decode_deep(data, "TIFF", keep_extra=info.alpha)
    rgb, depth_notes = deep_pixels.deep_to_rgb(array, "TIFF", max_side)
    swap = info.orientation in (5, 6, 7, 8)
    displayed = (info.height, info.width) if swap else (info.width, info.height)
    return oriented_fit(rgb, displayed, info.orientation, notes + depth_notes, max_side, already=oriented)


def _extension_notes(name: str, label: str) -> list[str]:
    ext = Path(name).suffix.lower()
    expected = _EXTENSIONS.get(ext)
    if expected is None or expected == label:
        return []
    return [f"the file name ends in {ext} but the content is {label}; decoded as {label}"]


def _select_first_frame(img: Image.Image, fmt: str, label: str) -> list[str]:
    # MPO "frames" are the photo plus camera previews, not frames the user cares about.
    n_frames = 1 if fmt == "MPO" else getattr(img, "n_frames", 1)
    if n_frames <= 1:
        return []
    img.seek(0)
    kind = "multi-page" if label == "TIFF" else "animated"
    return [f"{kind} {label}: first of {n_frames} frames used"]


def _to_rgb(img: Image.Image, label: str) -> tuple[Image.Image, list[str]]:
    """Any Pillow mode -> 8-bit RGB, with a note for each lossy or visible change."""
    mode = img.mode
    if mode in _HIGH_DEPTH_MODES:
        return deep_pixels.deep_grey_to_rgb(img, label)
    if mode == "RGB":
        return img.copy(), []  # copy: detach from the decoder and its BytesIO
    if mode == "CMYK":
        return img.convert("RGB"), ["CMYK colours converted to RGB"]
    notes = ["grayscale image (no colour information)"] if mode in ("1", "L", "LA") else []
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa", "RGBA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        if img.getchannel("A").getextrema()[0] < 255:
            # The model never saw transparency; white matches the slide background.
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, img)
            notes.append("transparent areas composited over a white background")
    return img.convert("RGB"), notes
