"""Safe loading of uploaded microscopy images.

Every upload goes through `load_image_bytes`, which either returns a small RGB image ready
for the model or raises `ImageRejected` whose message is a sentence a clinician can read.
No other exception escapes: Pillow raises OSError, SyntaxError, ValueError, EOFError,
struct.error ... on hostile or damaged files, and all of them become `ImageRejected`.

Decisions worth knowing:
* The decoder is chosen from the content, never from the extension; only formats in
  `ALLOWED_FORMATS` are decoded (MPO is how Pillow names many phone JPEGs).
* The pixel count declared in the header is checked against ``max_pixels`` before any
  pixel data is decoded. Pillow's own `Image.MAX_IMAGE_PIXELS` guard is kept as an
  outer ceiling (its warning is turned into a refusal), so raising ``max_pixels`` above
  Pillow's limit has no effect.
* 16-bit, 32-bit and float images, grey or colour, are contrast-stretched from their own
  min-max range, not from the dtype range: microscopy cameras often fill only 10-14 bits of a
  16-bit container, and dividing by 65535 would give an almost black picture. Colour ones are
  decoded at full depth in `core.deep_pixels` (Pillow would keep only their high byte).
* ``original_size`` is the full-resolution size as displayed, i.e. after EXIF rotation.
"""
from __future__ import annotations

import hashlib
import io
import math
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from PIL import Image, ImageOps, UnidentifiedImageError

from . import deep_pixels
from .settings import load_settings

ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "GIF", "WEBP"})
_SUPPORTED_TEXT = "JPEG, PNG, TIFF, BMP, GIF or WebP"
# Extension -> the format it promises; only used to write a note, never to pick a decoder.
_EXTENSIONS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF",
    ".webp": "WEBP",
}
# Formats Pillow cannot even identify, but that users commonly upload: say what they are.
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF",
               b"avif": "AVIF"}
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_ORIENTATION_TAG = 0x0112


class ImageRejected(ValueError):
    """The upload cannot be described; ``str(exc)`` says why, in one plain sentence."""


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, 8-bit, orientation applied, longest side <= max_side
    sha256: str  # of the original bytes, so identical uploads share one stored copy
    file_name: str  # sanitised basename, for display only
    n_bytes: int
    original_size: tuple[int, int]  # (width, height) at full resolution, after rotation
    notes: tuple[str, ...]  # what was done to the image, in plain words


def load_image_bytes(data: bytes, file_name: str, *, max_bytes: int | None = None,
                     max_pixels: int | None = None, max_side: int = 1024,
                     min_side: int = 16) -> LoadedImage:
    """Validate and decode an uploaded image into a small RGB `LoadedImage`.

    ``max_bytes`` and ``max_pixels`` default to the settings (HEMASCRIBE_MAX_UPLOAD_MB,
    HEMASCRIBE_MAX_PIXELS). Raises `ImageRejected` for anything that cannot be shown.
    """
    name = _safe_name(file_name)
    max_bytes, max_pixels = _limits(max_bytes, max_pixels)
    data = bytes(data)  # accept bytearray / memoryview from upload widgets
    _check_raw_bytes(data, name, max_bytes)
    try:
        # catch_warnings: silence Pillow's chatter (e.g. odd EXIF) and make its
        # decompression-bomb warning a hard error instead of a printed line. (The filter
        # is process-global before Python 3.14; our own max_pixels check does not rely on it.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, original_size, notes = _decode(data, name, max_pixels, max_side, min_side)
    except ImageRejected:
        raise
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
                            f"not be decoded ({_short(exc)}).") from exc
    return LoadedImage(image=image, sha256=hashlib.sha256(data).hexdigest(),
                       file_name=name, n_bytes=len(data), original_size=original_size,
                       notes=tuple(notes))


def load_image_path(path, *, max_bytes: int | None = None, max_pixels: int | None = None,
                    max_side: int = 1024, min_side: int = 16) -> LoadedImage:
    """Read an image file and load it with `load_image_bytes`.

    The size is checked with stat() before reading, so an oversized file is refused
    without being read into memory.
    """
    path = Path(path)
    name = _safe_name(path.name)
    max_bytes, max_pixels = _limits(max_bytes, max_pixels)
    try:
        if not path.is_file():
            raise ImageRejected(f"{name}: the file does not exist or is not a regular file.")
        _check_size(path.stat().st_size, name, max_bytes)
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # +1: notice a file that grew after stat()
    except OSError as exc:
        raise ImageRejected(f"{name}: the file could not be read "
                            f"({exc.strerror or _short(exc)}).") from exc
    return load_image_bytes(data, path.name, max_bytes=max_bytes, max_pixels=max_pixels,
                            max_side=max_side, min_side=min_side)


def _limits(max_bytes: int | None, max_pixels: int | None) -> tuple[int, int]:
    if max_bytes is None or max_pixels is None:
        settings = load_settings()
        if max_bytes is None:
            max_bytes = int(settings.max_upload_mb * 1024 * 1024)
        if max_pixels is None:
            max_pixels = settings.max_pixels
    return int(max_bytes), int(max_pixels)


def _safe_name(file_name) -> str:
    """Basename only, printable characters only: the name is shown in HTML and logs."""
    base = PureWindowsPath(str(file_name or "")).name  # splits on both "\\" and "/"
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    if len(base) > 120:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:100] + "..." + dot + ext) if dot and len(ext) <= 10 else base[:120]
    return base or "image"


def _human_size(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def _check_size(n_bytes: int, name: str, max_bytes: int) -> None:
    if n_bytes == 0:
        raise ImageRejected(f"{name}: the file is empty (0 bytes).")
    if n_bytes > max_bytes:
        raise ImageRejected(f"{name}: the file is {_human_size(n_bytes)}, larger than the "
                            f"upload limit of {_human_size(max_bytes)}.")


def _check_raw_bytes(data: bytes, name: str, max_bytes: int) -> None:
    """Refuse on size and on well-known non-image signatures, before Pillow sees the data."""
    _check_size(len(data), name, max_bytes)
    if b"%PDF-" in data[:1024]:  # the PDF header may follow a little junk
        raise ImageRejected(f"{name}: PDF documents are not supported; export the cell as "
                            f"an image (PNG or JPEG).")
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        fmt = _ISO_BRANDS[data[8:12]]
        raise ImageRejected(f"{name}: {fmt} images are not supported; export the image as "
                            f"{_SUPPORTED_TEXT}.")


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
        raise ImageRejected(f"{name}: {fmt} images are not supported; use {_SUPPORTED_TEXT}.")
    label = "JPEG" if fmt == "MPO" else fmt
    width, height = img.size
    _check_dimensions(name, width, height, max_pixels, min_side)
    if fmt in ("PNG", "TIFF") and deep_pixels.is_deep_colour(img):
        notes = _extension_notes(name, label) + _select_first_frame(img, fmt, label)
        rgb, depth_notes = deep_pixels.deep_to_rgb(deep_pixels.decode_deep(data, fmt), label)
        return _fit(rgb, (width, height), notes + depth_notes, max_side)
    if fmt == "PNG":
        # Pillow does not check IDAT checksums while decoding, so a damaged PNG can
        # decode to garbage; verify() checks every chunk's CRC (on a second handle,
        # because verify() leaves its image unusable).
        Image.open(io.BytesIO(data)).verify()
    notes = _extension_notes(name, label) + _select_first_frame(img, fmt, label)
    orientation = _orientation(img)
    if label == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a 6000x6000 photo never needs
        # to exist at full size in memory. draft() keeps both sides >= the target.
        img.draft(img.mode, _fit_size((width, height), max_side))
    img.load()  # force the full decode now, so truncated data fails here
    if orientation in range(2, 9):
        img = ImageOps.exif_transpose(img)
        notes.append(f"rotated/flipped according to the EXIF orientation tag ({orientation})")
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    rgb, mode_notes = _to_rgb(img, label)
    return _fit(rgb, (width, height), notes + mode_notes, max_side)


def _check_dimensions(name: str, width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:  # header only: nothing decoded yet
        raise ImageRejected(
            f"{name}: the image declares {width}x{height} = {width * height:,} pixels, more "
            f"than the limit of {max_pixels:,}; refused as a possible decompression bomb.")
    if min(width, height) < min_side:
        raise ImageRejected(f"{name}: the image is only {width}x{height} pixels; each side "
                            f"must be at least {min_side} pixels.")


def _fit(rgb: Image.Image, size: tuple[int, int], notes: list[str], max_side: int):
    """Downscale to max_side (with a note); returns (rgb, original size, notes)."""
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if rgb.size != size:
        notes.append(f"downscaled from {size[0]}x{size[1]} to {rgb.width}x{rgb.height}")
    return rgb, size, notes


def _decode_tiff_pillow_cannot_open(data: bytes, name: str, max_pixels: int, max_side: int, min_side: int):
    """Planar or floating-point colour TIFFs (see core.deep_pixels), same checks and result."""
    width, height = deep_pixels.tiff_size(data)
    _check_dimensions(name, width, height, max_pixels, min_side)
    rgb, notes = deep_pixels.deep_to_rgb(deep_pixels.decode_deep(data, "TIFF"), "TIFF")
    return _fit(rgb, (width, height), _extension_notes(name, "TIFF") + notes, max_side)


def _fit_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    scale = min(1.0, max_side / max(size))
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))


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


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF is common and must not block the image
        return 1
    return value if 1 <= value <= 8 else 1


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
