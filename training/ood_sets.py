"""Out-of-scope image sets made from what installed packages ship, for the reliability report:
natural photos (scikit-image's data module, scikit-learn's sample images), and blank, noise
and text images drawn here. None of these is ever used to fit a threshold."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PHOTOS = ["astronaut", "cat", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera", "coins", "moon",
          "grass", "gravel", "brick", "horse", "clock"]


def _crops(image: Image.Image, rng: np.random.Generator, n: int) -> list[Image.Image]:
    """The full image plus random square crops of 30-90% of its shorter side."""
    out = [image]
    w, h = image.size
    for _ in range(n - 1):
        side = int(min(w, h) * rng.uniform(0.3, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(image.crop((x, y, x + side, y + side)))
    return out


def natural_photos(seed: int = 0, crops_per_photo: int = 8) -> list[Image.Image]:
    """Photos shipped by scikit-image and scikit-learn, with random crops."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    arrays = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    images = [Image.fromarray(a).convert("RGB") for a in arrays]
    return [crop for image in images for crop in _crops(image, rng, crops_per_photo)]


def blank_images(n: int = 30, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Uniform images: white, black, grey, slide-background pinks and random colours."""
    rng = np.random.default_rng(seed)
    fixed = [(255, 255, 255), (0, 0, 0), (128, 128, 128), (235, 205, 210), (245, 235, 240), (220, 220, 235)]
    colours = fixed + [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(n - len(fixed))]
    return [Image.new("RGB", (size, size), colour) for colour in colours[:n]]


def noise_images(n: int = 30, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Gaussian, uniform, coloured low-frequency and salt-and-pepper noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = rng.normal(128, 50, (size, size, 3))
        elif kind == 1:
            a = rng.uniform(0, 255, (size, size, 3))
        elif kind == 2:
            small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
            a = np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), float)
        else:
            a = np.where(rng.random((size, size, 1)) < 0.5, 0, 255) * np.ones((1, 1, 3))
        images.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return images


def text_images(n: int = 30, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Black-on-white (and some coloured) text, like a scanned report or a screenshot."""
    rng = np.random.default_rng(seed)
    words = "blood smear report patient neutrophil count laboratory result normal range slide stain".split()
    font = ImageFont.load_default(size=int(rng.integers(14, 30)))
    images = []
    for i in range(n):
        background = (255, 255, 255) if i % 3 else tuple(int(c) for c in rng.integers(150, 256, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for line in range(int(rng.integers(3, 10))):
            text = " ".join(rng.choice(words, int(rng.integers(2, 5))))
            draw.text((int(rng.integers(2, 30)), 8 + line * 22), text, fill=(0, 0, 0), font=font)
        images.append(image)
    return images
