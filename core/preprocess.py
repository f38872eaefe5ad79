"""Pixels to model input, shared by training, evaluation and the app so that all three
see images prepared the same way (the preprocessing travels with the model config)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then resize to size x size (RGB). Microscopy crops put the cell
    of interest in the centre; cropping (not padding) keeps the image free of borders."""
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        image.draft(image.mode, (size * 2, size * 2))  # decode at reduced scale: faster
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def to_uint8_array(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) uint8 array of the square-resized image."""
    return np.asarray(square_resize(image, size), dtype=np.uint8).transpose(2, 0, 1).copy()


def to_model_input(images: list[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) float tensor in [0, 1] for `DualEncoder.encode_image`."""
    batch = np.stack([to_uint8_array(image, size) for image in images])
    return torch.from_numpy(batch).float().div_(255)
