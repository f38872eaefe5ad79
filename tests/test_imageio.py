"""Tests for core.imageio: every file is generated here, in memory or in tmp_path."""
from __future__ import annotations

import hashlib
import io
import pathlib
import random
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, features

from core.imageio import ImageRejected, LoadedImage, load_image_bytes, load_image_path, prepare_image

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


@pytest.fixture(autouse=True)
def _default_settings(monkeypatch):
    # The limits default to the settings; make sure the developer's shell does not leak in.
    monkeypatch.delenv("HEMASCRIBE_MAX_UPLOAD_MB", raising=False)
    monkeypatch.delenv("HEMASCRIBE_MAX_PIXELS", raising=False)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise(size=(256, 256), seed=0) -> Image.Image:
    """Random pixels, so that encoded files have real data to truncate or corrupt."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def close(actual, expected, tol=12) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares width x height (8-bit RGB); the IDAT is a stub."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def assert_rgb(loaded: LoadedImage) -> None:
    assert isinstance(loaded, LoadedImage)
    assert loaded.image.mode == "RGB"
    assert np.asarray(loaded.image).dtype == np.uint8


# --- refusals -----------------------------------------------------------------------

def test_zero_byte_file_is_refused():
    with pytest.raises(ImageRejected, match=r"photo\.jpg: the file is empty \(0 bytes\)\."):
        load_image_bytes(b"", "photo.jpg")


def test_zero_byte_file_on_disk_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageRejected, match="empty"):
        load_image_path(path)


@pytest.mark.parametrize("name", ["cell.jpg", "cell.png", "cell.tif"])
def test_non_image_bytes_with_image_extension_are_refused(name):
    data = b"Hello, this is a text file pretending to be a blood smear.\n" * 20
    with pytest.raises(ImageRejected, match="not a recognisable image") as info:
        load_image_bytes(data, name)
    assert str(info.value).startswith(name)


def test_pdf_is_refused_with_advice():
    data = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n"
    with pytest.raises(ImageRejected,
                       match="PDF documents are not supported; export the cell as an image"):
        load_image_bytes(data, "report.pdf")
    with pytest.raises(ImageRejected, match="PDF"):  # the extension does not matter
        load_image_bytes(data, "report.png")


def test_heic_is_refused_by_name():
    data = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 100
    with pytest.raises(ImageRejected, match="HEIC images are not supported"):
        load_image_bytes(data, "IMG_0001.HEIC")


@pytest.mark.parametrize("fmt", ["ICO", "PPM"])
def test_format_outside_allow_list_is_refused_by_name(fmt):
    data = encode(noise((32, 32)), fmt)
    with pytest.raises(ImageRejected, match=f"{fmt} images are not supported"):
        load_image_bytes(data, "cell.png")


def _truncated_jpeg() -> bytes:
    data = encode(noise(), "JPEG", quality=90)
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    data = encode(noise(), "PNG")
    return data[: len(data) // 2]


def _corrupted_png() -> bytes:
    data = bytearray(encode(noise(), "PNG"))
    start = data.index(b"IDAT") + 4 + 200
    data[start:start + 400] = bytes(400)  # wipe part of the deflate stream
    return bytes(data)


def _jpeg_with_garbage_body() -> bytes:
    return b"\xff\xd8\xff\xe0" + random.Random(1).randbytes(4000)


@pytest.mark.parametrize("make", [_truncated_jpeg, _truncated_png, _corrupted_png,
                                  _jpeg_with_garbage_body])
def test_truncated_or_corrupted_files_are_refused(make):
    with pytest.raises(ImageRejected) as info:
        load_image_bytes(make(), "smear.img")
    message = str(info.value)
    assert message.startswith("smear.img: ")
    assert "truncated" in message or "corrupted" in message or "recognisable" in message


def test_truncated_loading_is_not_enabled_globally():
    from PIL import ImageFile
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb_header_is_refused_without_decoding():
    data = png_with_header(100_000, 100_000)  # 10^10 pixels: 30 GB if ever decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageRejected, match="decompression bomb"):
        load_image_bytes(data, "bomb.png")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert after - before < 100 * 1024  # ru_maxrss is in KiB on Linux


def test_bomb_below_pillows_limit_is_refused_by_our_own_limit():
    data = png_with_header(9000, 9000)  # 81 MP: under Pillow's 89 MP, over our 60 MP default
    with pytest.raises(ImageRejected, match=r"9000x9000 = 81,000,000 pixels.*60,000,000"):
        load_image_bytes(data, "bomb.png")


def test_max_pixels_above_pillows_default_is_the_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    data = png_with_header(10_000, 9_500)  # 95 MP: over Pillow's 89 MP default, under the 100 MP asked for
    with pytest.raises(ImageRejected) as refused:
        load_image_bytes(data, "scan.png", max_pixels=100_000_000)
    assert "decompression bomb" not in str(refused.value)  # decoded as far as its stub data goes
    assert "truncated or corrupted" in str(refused.value)


def test_max_pixels_argument_and_setting(monkeypatch):
    data = encode(noise((100, 100)), "PNG")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        load_image_bytes(data, "a.png", max_pixels=5000)
    monkeypatch.setenv("HEMASCRIBE_MAX_PIXELS", "5000")
    with pytest.raises(ImageRejected, match="limit of 5,000"):
        load_image_bytes(data, "a.png")


def test_image_smaller_than_min_side_is_refused():
    data = encode(noise((40, 8)), "PNG")
    with pytest.raises(ImageRejected, match=r"only 40x8 pixels.*at least 16 pixels"):
        load_image_bytes(data, "tiny.png")
    assert load_image_bytes(data, "tiny.png", min_side=8).image.size == (40, 8)


def test_long_narrow_strip_is_refused_not_squashed_to_one_pixel():
    data = encode(Image.new("RGB", (60000, 16), GREEN), "PNG")
    with pytest.raises(ImageRejected, match=r"60000x16 pixels, too long and narrow"):
        load_image_bytes(data, "strip.png")
    assert load_image_bytes(encode(Image.new("RGB", (1024, 16), GREEN), "PNG"), "ok.png").image.size == (1024, 16)
    # at the boundary: what the loader accepts, the describe API's checks accept too (4096x61 would
    # shrink to 1024x15 by Pillow's rounding, so it is refused here, not later in a batch)
    with pytest.raises(ImageRejected, match="too long and narrow"):
        load_image_bytes(encode(Image.new("RGB", (4096, 61), GREEN), "PNG"), "edge.png")
    edge = load_image_bytes(encode(Image.new("RGB", (4096, 64), GREEN), "PNG"), "edge.png").image
    assert edge.size == (1024, 16) and prepare_image(edge)[0].size == (1024, 16)


def test_prepare_image_turns_what_still_carries_the_tag_and_nothing_twice():
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    noise((100, 200)).save(buffer, "JPEG", exif=exif)  # stored 100 wide, shown 200 wide
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert prepare_image(opened)[0].size == (200, 100)
    assert prepare_image(opened.convert("RGB"))[0].size == (200, 100)  # a converted copy keeps the tag
    assert prepare_image(ImageOps.exif_transpose(opened))[0].size == (200, 100)  # turned, tag removed
    loaded = load_image_bytes(buffer.getvalue(), "r.jpg").image
    assert prepare_image(loaded)[0].size == (200, 100)  # the loader's output is upright and tag-free


def test_file_larger_than_max_bytes_is_refused(monkeypatch):
    data = encode(noise((128, 128)), "PNG")
    with pytest.raises(ImageRejected, match="larger than the upload limit of 1.0 KB"):
        load_image_bytes(data, "big.png", max_bytes=1024)
    monkeypatch.setenv("HEMASCRIBE_MAX_UPLOAD_MB", "0.001")  # default comes from settings
    with pytest.raises(ImageRejected, match="larger than the upload limit"):
        load_image_bytes(data, "big.png")


def test_load_image_path_refuses_large_file_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    with path.open("wb") as fh:
        fh.truncate(20 * 1024 * 1024)  # sparse: costs no disk
    def forbidden_open(*args, **kwargs):
        raise AssertionError("the file was opened although it is too large")
    monkeypatch.setattr(pathlib.Path, "open", forbidden_open)
    with pytest.raises(ImageRejected, match=r"huge\.png: the file is 20\.0 MB, larger than"):
        load_image_path(path, max_bytes=1024 * 1024)


def test_load_image_path_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageRejected, match="does not exist"):
        load_image_path(tmp_path / "nope.png")
    with pytest.raises(ImageRejected, match="this is a folder, not an image file"):
        load_image_path(tmp_path)


def test_random_damage_never_raises_anything_else():
    """Whatever the bytes, the only possible exception is ImageRejected."""
    rng = random.Random(42)
    seeds = [encode(noise((48, 48)), fmt) for fmt in ("PNG", "JPEG", "GIF", "TIFF", "BMP")]
    for i in range(60):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] = rng.randrange(256)
        if i % 3 == 0:
            data = data[: rng.randrange(1, len(data))]
        try:
            result = load_image_bytes(bytes(data), "fuzz.bin")
        except ImageRejected as exc:
            assert str(exc).startswith("fuzz.bin: ")
        else:
            assert_rgb(result)


# --- accepted images ----------------------------------------------------------------

def test_plain_rgb_png_metadata():
    data = encode(Image.new("RGB", (64, 48), RED), "PNG")
    loaded = load_image_bytes(data, "../../etc/cell.png")
    assert_rgb(loaded)
    assert loaded.image.size == (64, 48) and loaded.original_size == (64, 48)
    assert loaded.file_name == "cell.png"
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.n_bytes == len(data)
    assert loaded.notes == ()


@pytest.mark.parametrize("raw, expected", [
    ("C:\\Users\\lab\\smear 1.png", "smear 1.png"),
    ("dir/sub/\x1b[31mcell\n.png", "[31mcell.png"),
    ("", "image"),
    ("..", "image"),
])
def test_file_name_is_sanitised(raw, expected):
    data = encode(Image.new("RGB", (32, 32), RED), "PNG")
    assert load_image_bytes(data, raw).file_name == expected


def test_huge_legal_jpeg_is_downscaled():
    img = Image.new("RGB", (6000, 4000), RED)
    img.paste(BLUE, (3000, 0, 6000, 4000))  # right half blue
    loaded = load_image_bytes(encode(img, "JPEG", quality=80), "whole_slide.jpg")
    assert_rgb(loaded)
    assert loaded.image.size == (1024, 683)
    assert loaded.original_size == (6000, 4000)
    assert "downscaled from 6000x4000 to 1024x683" in loaded.notes
    assert close(loaded.image.getpixel((100, 300)), RED, 30)
    assert close(loaded.image.getpixel((900, 300)), BLUE, 30)


def test_huge_png_is_downscaled_with_custom_max_side():
    data = encode(Image.new("RGB", (3000, 1500), GREEN), "PNG")
    loaded = load_image_bytes(data, "big.png", max_side=512)
    assert loaded.image.size == (512, 256)
    assert any("downscaled from 3000x1500" in n for n in loaded.notes)


@pytest.mark.parametrize("fmt", ["TIFF", "PNG"])
def test_16_bit_image_is_stretched_to_8_bit(fmt):
    arr = np.linspace(1000, 5000, 64 * 48).astype(np.uint16).reshape(48, 64)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    loaded = load_image_bytes(encode(img, fmt), f"scan.{fmt.lower()}")
    assert_rgb(loaded)
    out = np.asarray(loaded.image)
    assert out.shape == (48, 64, 3)
    assert out.min() == 0 and out.max() == 255  # its own range, not 0-65535
    assert (out[..., 0] == out[..., 1]).all()
    assert any(n.startswith(f"16-bit {fmt} converted to 8-bit") for n in loaded.notes)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_large_deep_image_is_averaged_not_strided_before_resizing(dtype):
    """Columns alternating 1000 / 3000 must shrink to their mean (2000), like the flat 2000 beside
    them; keeping every other pixel would read them as 1000 or 3000. A NaN must not blank its block."""
    import tifffile

    field = np.full((256, 256, 3), 2000.0)
    field[:, :128:2], field[:, 1:128:2] = 1000.0, 3000.0
    field[:16], field[-16:] = 4000.0, 0.0  # the range the image is stretched from
    if dtype == np.float32:
        field[100, 10] = np.nan
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, field.astype(dtype), photometric="rgb")
    out = np.asarray(load_image_bytes(buffer.getvalue(), "scan.tif", max_side=64).image).astype(float)
    middle = out[16:48]  # away from the bright and dark bands
    striped, flat = middle[:, 4:28].mean(), middle[:, 36:60].mean()
    assert abs(striped - flat) < 3, (striped, flat)
    assert abs(flat - 127.5) < 4


def test_16_bit_grey_alpha_png_is_noted_as_grey_and_composited():
    """OpenCV widens a grey+alpha PNG to RGBA; the note must still say grey."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    grey_alpha = np.zeros((40, 40, 2), np.uint16)
    grey_alpha[..., 0] = np.linspace(1000, 4000, 1600).reshape(40, 40)
    grey_alpha[..., 1] = 65535
    grey_alpha[:5, :5, 1] = 0  # a transparent corner
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in grey_alpha)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 16, 4, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    loaded = load_image_bytes(png, "grey_alpha.png")
    out = np.asarray(loaded.image)
    assert any(n.startswith("16-bit grey PNG converted") for n in loaded.notes), loaded.notes
    assert (out[0, 0] == 255).all() and (out[..., 0] == out[..., 2]).all()
    assert out[39, 39, 0] == 255 and out[0, 5, 0] == 0  # stretched over the opaque pixels only


def _colour_gradient(levels: int) -> np.ndarray:
    """(48, 64, 3) colour ramp using `levels` grey levels: red up, green down, blue flat."""
    ramp = np.linspace(0.05, 1.0, 64)[None, :].repeat(48, 0)
    rgb = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 0.5)], axis=-1)
    return np.round(rgb * (levels - 1))


def _deep_colour_file(layout: str) -> bytes:
    import cv2
    import tifffile

    twelve_bit = _colour_gradient(4096).astype(np.uint16)  # a camera filling 12 of 16 bits
    buffer = io.BytesIO()
    if layout == "png":
        return cv2.imencode(".png", twelve_bit[..., ::-1])[1].tobytes()  # OpenCV writes BGR
    if layout == "lzw":  # the usual compression of colour TIFFs; tifffile alone cannot read it here
        return cv2.imencode(".tiff", twelve_bit[..., ::-1])[1].tobytes()
    if layout == "float":
        tifffile.imwrite(buffer, (twelve_bit / 4095.0).astype(np.float32), photometric="rgb")
    elif layout == "planar":
        tifffile.imwrite(buffer, np.moveaxis(twelve_bit, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(buffer, twelve_bit, photometric="rgb", compression="zlib")
    return buffer.getvalue()


@pytest.mark.parametrize("layout", ["tiff", "lzw", "planar", "float", "png"])
def test_deep_colour_images_are_decoded_at_full_depth(layout):
    """Pillow alone keeps the high byte of 16-bit colour samples (a 12-bit image comes out black:
    max 15) and cannot open planar or float colour TIFFs; they must look like the 8-bit image."""
    loaded = load_image_bytes(_deep_colour_file(layout), f"camera.{'png' if layout == 'png' else 'tif'}")
    assert_rgb(loaded)
    out = np.asarray(loaded.image).astype(int)
    expected = _colour_gradient(256)
    stretched = (expected - expected.min()) * 255 / (expected.max() - expected.min())
    assert np.abs(out - stretched).max() <= 2  # colour kept: one range for all channels
    assert any("colour" in n and "converted to 8-bit by stretching" in n for n in loaded.notes)


def test_deep_images_with_alpha_orientation_or_pages_load_like_8_bit_ones():
    import cv2
    import tifffile

    square = np.zeros((40, 60, 4), np.uint16)  # transparent, black where transparent
    square[10:30, 20:40] = (3000, 1000, 4000, 65535)  # an opaque purple patch, 12-bit colour
    rgba = load_image_bytes(cv2.imencode(".png", square[..., [2, 1, 0, 3]])[1].tobytes(), "rgba.png")
    out = np.asarray(rgba.image)
    assert tuple(out[0, 0]) == (255, 255, 255) and out[20, 30].max() == 255  # white outside, stretched inside
    grey_alpha = np.stack([np.full((40, 60), 2000, np.uint16), np.full((40, 60), 65535, np.uint16)], -1)
    grey_alpha[:, 30:, 0] = 4000
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, grey_alpha, photometric="minisblack", extrasamples=["unassalpha"])
    loaded = load_image_bytes(buffer.getvalue(), "grey_alpha.tif")
    assert loaded.image.mode == "RGB" and np.asarray(loaded.image).max() == 255  # alpha did not set the range
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, _colour_gradient(4096).astype(np.uint16), photometric="rgb",
                     extratags=[(274, "H", 1, 6, False)])  # EXIF/TIFF orientation 6: rotate to display
    rotated = load_image_bytes(buffer.getvalue(), "rotated.tif")
    assert rotated.image.size == (48, 64) and rotated.original_size == (48, 64)
    assert not any("downscaled" in n for n in rotated.notes)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for _ in range(3):
            writer.write(_colour_gradient(2).astype(np.float32), photometric="rgb")
    assert any("first of 3 frames" in n for n in load_image_bytes(buffer.getvalue(), "stack.tif").notes)


def test_deep_tiffs_pillow_cannot_open_are_oriented_and_extra_samples_are_not_alpha():
    import tifffile

    upright = _colour_gradient(4096)  # (48, 64, 3)
    buffer = io.BytesIO()  # float colour: only tifffile reads it; stored rotated, tag 6 turns it upright
    tifffile.imwrite(buffer, np.rot90(upright, 1).astype(np.float32), photometric="rgb",
                     extratags=[(274, "H", 1, 6, False)])
    loaded = load_image_bytes(buffer.getvalue(), "rotated_float.tif")
    assert loaded.image.size == (64, 48) and loaded.original_size == (64, 48)
    stretched = (upright - upright.min()) * 255 / (upright.max() - upright.min())
    assert np.abs(np.asarray(loaded.image).astype(int) - stretched).max() <= 2
    with_extra = np.concatenate([upright, np.zeros((48, 64, 1))], -1).astype(np.uint16)
    buffer = io.BytesIO()  # a 4th sample of unspecified meaning (extrasamples 0) is not transparency
    tifffile.imwrite(buffer, with_extra, photometric="rgb", extrasamples=[0])
    loaded = load_image_bytes(buffer.getvalue(), "extra.tif")
    assert np.abs(np.asarray(loaded.image).astype(int) - stretched).max() <= 2
    assert not any("transparent" in n for n in loaded.notes)


def test_deep_tiff_with_many_samples_is_refused_before_decoding():
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((64, 64, 40), np.uint16), photometric="minisblack", planarconfig="contig",
                     compression="zlib")
    with pytest.raises(ImageRejected, match="samples per pixel"):
        load_image_bytes(buffer.getvalue(), "hyperspectral.tif")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((256, 256, 3), np.float64), photometric="rgb", compression="zlib")
    with pytest.raises(ImageRejected, match="decompression bomb"):  # 1.5 MB of samples for 64k pixels
        load_image_bytes(buffer.getvalue(), "wide.tif", max_pixels=256 * 256 // 4)
    buffer = io.BytesIO()  # a small image in huge tiles: tifffile would allocate whole tiles
    tifffile.imwrite(buffer, np.zeros((32, 48, 3), np.uint16), photometric="rgb", tile=(2048, 2048),
                     compression="zlib")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        load_image_bytes(buffer.getvalue(), "tiles.tif", max_pixels=1_000_000)


def test_float_tiff_is_stretched_and_ignores_nan():
    arr = np.linspace(-2.0, 6.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    arr[0, 0] = np.nan
    arr[0, 1] = np.inf
    img = Image.fromarray(arr)
    assert img.mode == "F"
    loaded = load_image_bytes(encode(img, "TIFF"), "fluor.tif")
    assert_rgb(loaded)
    out = np.asarray(loaded.image)[..., 0]
    assert out[-1, -1] == 255 and out[0, 2] < 5
    assert any(n.startswith("floating-point TIFF converted to 8-bit") for n in loaded.notes)


@pytest.mark.parametrize("mode, color, expected", [
    ("L", 128, (128, 128, 128)),
    ("LA", (200, 255), (200, 200, 200)),
    ("1", 1, WHITE),
])
def test_grayscale_modes_become_rgb(mode, color, expected):
    data = encode(Image.new(mode, (40, 30), color), "PNG")
    loaded = load_image_bytes(data, "gray.png")
    assert_rgb(loaded)
    assert loaded.image.size == (40, 30)
    assert loaded.image.getpixel((5, 5)) == expected
    assert "grayscale image (no colour information)" in loaded.notes


def test_palette_png_with_transparency_is_composited_over_white():
    img = Image.new("P", (32, 32), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 16, 32))  # left half uses index 0, which is transparent
    loaded = load_image_bytes(encode(img, "PNG", transparency=0), "palette.png")
    assert_rgb(loaded)
    assert loaded.image.getpixel((4, 4)) == WHITE
    assert loaded.image.getpixel((28, 4)) == RED
    assert "transparent areas composited over a white background" in loaded.notes


def test_palette_png_without_transparency():
    img = Image.new("RGB", (32, 32), BLUE).convert("P")
    loaded = load_image_bytes(encode(img, "PNG"), "palette.png")
    assert loaded.image.getpixel((4, 4)) == BLUE
    assert loaded.notes == ()


def test_rgba_transparency_is_composited_over_white():
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    img.paste((0, 0, 255, 128), (16, 16, 32, 32))  # bottom right half-transparent blue
    loaded = load_image_bytes(encode(img, "PNG"), "rgba.png")
    assert_rgb(loaded)
    assert loaded.image.getpixel((4, 4)) == WHITE
    assert loaded.image.getpixel((28, 4)) == RED
    assert close(loaded.image.getpixel((28, 28)), (127, 127, 255), 2)
    assert "transparent areas composited over a white background" in loaded.notes


def test_opaque_rgba_has_no_transparency_note():
    loaded = load_image_bytes(encode(Image.new("RGBA", (32, 32), (1, 2, 3, 255)), "PNG"),
                              "rgba.png")
    assert loaded.image.getpixel((0, 0)) == (1, 2, 3)
    assert loaded.notes == ()


def test_cmyk_jpeg_is_converted():
    img = Image.new("CMYK", (48, 48), (0, 255, 0, 0))  # pure magenta ink
    loaded = load_image_bytes(encode(img, "JPEG", quality=95), "cmyk.jpg")
    assert_rgb(loaded)
    assert close(loaded.image.getpixel((24, 24)), (255, 0, 255), 20)
    assert "CMYK colours converted to RGB" in loaded.notes


def test_exif_rotated_jpeg_is_transposed():
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": stored left becomes displayed top
    loaded = load_image_bytes(encode(img, "JPEG", quality=95, exif=exif), "phone.jpg")
    assert_rgb(loaded)
    assert loaded.image.size == (32, 64)
    assert loaded.original_size == (32, 64)
    assert close(loaded.image.getpixel((16, 8)), RED, 30)
    assert close(loaded.image.getpixel((16, 56)), BLUE, 30)
    assert any("EXIF orientation" in n for n in loaded.notes)


def test_exif_rotation_and_downscale_together():
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (2400, 1200), GREEN), "JPEG", exif=exif)
    loaded = load_image_bytes(data, "phone.jpg")
    assert loaded.image.size == (512, 1024)
    assert loaded.original_size == (1200, 2400)
    assert "downscaled from 1200x2400 to 512x1024" in loaded.notes


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (40, 40), c) for c in (RED, GREEN, BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    loaded = load_image_bytes(data, "anim.gif")
    assert_rgb(loaded)
    assert close(loaded.image.getpixel((20, 20)), RED, 5)
    assert "animated GIF: first of 3 frames used" in loaded.notes


def test_multi_page_tiff_uses_first_page():
    pages = [Image.new("RGB", (40, 30), c) for c in (BLUE, RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    loaded = load_image_bytes(data, "stack.tiff")
    assert loaded.image.getpixel((20, 15)) == BLUE
    assert "multi-page TIFF: first of 2 frames used" in loaded.notes


def test_png_named_jpg_is_decoded_by_content():
    data = encode(Image.new("RGB", (32, 32), GREEN), "PNG")
    loaded = load_image_bytes(data, "cell.jpg")
    assert loaded.image.getpixel((0, 0)) == GREEN  # lossless, so really decoded as PNG
    assert any(".jpg" in n and "PNG" in n for n in loaded.notes)


def test_bmp_is_accepted():
    loaded = load_image_bytes(encode(Image.new("RGB", (30, 20), BLUE), "BMP"), "old.bmp")
    assert_rgb(loaded)
    assert loaded.image.size == (30, 20) and loaded.image.getpixel((0, 0)) == BLUE


@pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")
def test_webp_is_accepted():
    data = encode(Image.new("RGB", (30, 20), RED), "WEBP", lossless=True)
    loaded = load_image_bytes(data, "cell.webp")
    assert loaded.image.getpixel((0, 0)) == RED and loaded.notes == ()


def test_load_image_path_reads_file(tmp_path):
    path = tmp_path / "sub" / "smear.png"
    path.parent.mkdir()
    data = encode(Image.new("RGB", (50, 40), RED), "PNG")
    path.write_bytes(data)
    loaded = load_image_path(str(path))
    assert loaded.file_name == "smear.png"
    assert loaded.sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.image.size == (50, 40)
