"""Checks on an upload before any decoder sees it: its size, well-known non-image signatures,
and a file name that is safe to show; the limits come from the settings."""
from __future__ import annotations

import math
import unicodedata
from pathlib import PureWindowsPath

from .settings import SettingsError, load_settings

SUPPORTED_TEXT = "JPEG, PNG, TIFF, BMP, GIF or WebP"
# Formats Pillow cannot even identify, but that users commonly upload: say what they are.
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"mif1": "HEIF",
               b"avif": "AVIF"}


class ImageRejected(ValueError):
    """The upload cannot be described; ``str(exc)`` says why, in one plain sentence."""


def upload_limits(max_bytes: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(max_bytes, max_pixels), each from the settings where not given."""
    if max_bytes is None or max_pixels is None:
        try:
            settings = load_settings()
        except SettingsError as error:  # every file would fail the same way: say why, once per file
            raise ImageRejected(f"no image can be checked: {error}.") from error
        if max_bytes is None:
            max_bytes = int(settings.max_upload_mb * 1024 * 1024)
        if max_pixels is None:
            max_pixels = settings.max_pixels
    return int(max_bytes), int(max_pixels)


def safe_name(file_name) -> str:
    """Basename only, printable characters only: the name is shown in HTML and logs."""
    base = PureWindowsPath(str(file_name or "")).name  # splits on both "\\" and "/"
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    if len(base) > 120:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:100] + "..." + dot + ext) if dot and len(ext) <= 10 else base[:120]
    return base or "image"


def human_size(n: float) -> str:
    """'512 bytes', '1.5 KB', '12.0 MB'."""
    if n < 1024:
        return f"{int(n)} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def short_reason(exc: BaseException) -> str:
    """First line of an exception's message (its type when empty), at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def check_size(n_bytes: int, name: str, max_bytes: int) -> None:
    """Refuse an empty file or one over the upload limit."""
    if n_bytes == 0:
        raise ImageRejected(f"{name}: the file is empty (0 bytes).")
    if n_bytes > max_bytes:
        raise ImageRejected(f"{name}: the file is {human_size(n_bytes)}, larger than the "
                            f"upload limit of {human_size(max_bytes)}.")


def check_raw_bytes(data: bytes, name: str, max_bytes: int) -> None:
    """Refuse on size and on well-known non-image signatures, before Pillow sees the data."""
    check_size(len(data), name, max_bytes)
    if b"%PDF-" in data[:1024]:  # the PDF header may follow a little junk
        raise ImageRejected(f"{name}: PDF documents are not supported; export the cell as "
                            f"an image (PNG or JPEG).")
    if data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        fmt = _ISO_BRANDS[data[8:12]]
        raise ImageRejected(f"{name}: {fmt} images are not supported; export the image as "
                            f"{SUPPORTED_TEXT}.")


def check_dimensions(name: str, width: int, height: int, max_pixels: int, min_side: int, max_side: int) -> None:
    """Refuse (ImageRejected) from the header's size alone: more pixels than `max_pixels`, a side
    under `min_side`, or a strip too long and narrow to describe."""
    if width * height > max_pixels:  # header only: nothing decoded yet
        raise ImageRejected(
            f"{name}: the image declares {width}x{height} = {width * height:,} pixels, more "
            f"than the limit of {max_pixels:,}; refused as a possible decompression bomb.")
    if min(width, height) < min_side:
        raise ImageRejected(f"{name}: the image is only {width}x{height} pixels; each side "
                            f"must be at least {min_side} pixels.")
    # a strip, not a cell or a field: its short side would fall under min_side once the long side
    # fits max_side (exact arithmetic: a rounded size could pass here and fail a later check)
    if max(width, height) > max_side and min(width, height) * max_side < min_side * max(width, height):
        raise ImageRejected(f"{name}: the image is {width}x{height} pixels, too long and narrow to "
                            f"describe (a side may be at most {max_side // min_side} times the other).")


def fit_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is at most `max_side` (rounded up)."""
    scale = min(1.0, max_side / max(size))
    return max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))
