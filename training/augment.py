"""Batched image augmentation on tensors, designed against cross-site shortcuts.

Other hospitals' images differ from PBC in zoom, stain hue, background, blur and size. We
randomise exactly those on whole batches (vectorised, cheap on 2 CPU cores):

* geometry: any rotation and flips (cells have no up), zoom from 0.65x to 1.5x, small shifts;
  reflection padding so a zoomed-out image has no constant border to learn from;
* colour: per-channel gains (stain balance), hue rotation, saturation, brightness, contrast,
  gamma, occasional grayscale;
* optics: Gaussian blur of random strength, sensor noise; a down-and-up resampling that
  imitates low-resolution cameras and JPEG softness.

The images may live on any device (on a GPU the augmentation runs there: on the CPU it took
most of a GPU training step). Every random number but the per-pixel noise is drawn on the CPU
from the caller's generator and moved to the images' device; the noise is drawn where the images
are, from a generator seeded from the caller's (`gaussian_noise`). One seed gives one augmentation
per kind of device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of one augmentation preset (zoom, stain, optics, noise), as data."""
    zoom: tuple[float, float] = (0.65, 1.5)  # field-of-view factor range (log-uniform)
    hue: float = 0.35  # largest hue rotation, radians
    gain: float = 0.2  # per-channel stain gain in 1 +- gain
    saturation: tuple[float, float] = (0.5, 1.5)
    optics_share: float = 2 / 3  # share of images blurred or resampled at low resolution
    grey_p: float = 0.05  # probability of dropping colour entirely


AUGMENT_PRESETS = {
    "strong": AugmentConfig(),
    "medium": AugmentConfig(zoom=(0.75, 1.35), hue=0.2, gain=0.12, saturation=(0.7, 1.3), optics_share=0.4, grey_p=0.02),
    # zoom-in to 0.5x field of view: other labs' crops show the cell about twice as large
    # (BCCD), so that magnification must be inside the training distribution
    "wide_zoom": AugmentConfig(zoom=(0.5, 1.5), hue=0.2, gain=0.12, saturation=(0.7, 1.3), optics_share=0.5, grey_p=0.02),
    # strong, with the zoom-in of wide_zoom only: separates the zoom question from wide_zoom's milder colour
    "strong_zoom": AugmentConfig(zoom=(0.5, 1.5)),
    "mild": AugmentConfig(zoom=(0.85, 1.2), hue=0.08, gain=0.06, saturation=(0.85, 1.15), optics_share=0.15, grey_p=0.0),
    # mild's zoom and optics with strong's colour: a final phase that fits the home lab's scale and
    # sharpness but not its stain (a mild ending cost the other lab's eosinophils, run v15)
    "mild_geometry": AugmentConfig(zoom=(0.85, 1.2), optics_share=0.15),
}


def random_affine(images: torch.Tensor, out_size: int, generator: torch.Generator,
                  zoom: tuple[float, float] = (0.65, 1.5)) -> torch.Tensor:
    """Rotate, flip, zoom and shift each image of (B, 3, H, W) into (B, 3, out, out)."""
    b = images.shape[0]
    angle = torch.rand(b, generator=generator) * 2 * math.pi
    # log-uniform zoom: >1 shows more of the field (cell looks smaller), <1 zooms in
    log_lo, log_hi = math.log(zoom[0]), math.log(zoom[1])
    scale = torch.exp(torch.rand(b, generator=generator) * (log_hi - log_lo) + log_lo)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.2
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([
        torch.stack([cos * flip, -sin, shift[:, 0]], dim=1),
        torch.stack([sin * flip, cos, shift[:, 1]], dim=1),
    ], dim=1).to(images)
    grid = F.affine_grid(theta, (b, 3, out_size, out_size), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _rand(b: int, lo: float, hi: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """(b, 1, 1, 1) uniform in [lo, hi), drawn on the CPU, on `like`'s device and dtype."""
    return (torch.rand(b, 1, 1, 1, generator=generator) * (hi - lo) + lo).to(like)


def hue_rotate(images: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `angle` radians (B,) around the grey axis (a rotation in YIQ space)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = torch.linalg.inv(to_yiq)
    angle = angle.cpu()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(angle.shape[0], 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    matrix = (to_rgb @ rot @ to_yiq).to(images)  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, images)


def colour_jitter(images: torch.Tensor, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Stain and exposure changes for images in [0, 1]."""
    b = images.shape[0]
    gains = (1 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * cfg.gain).to(images)
    images = images * gains  # per-channel stain balance
    images = hue_rotate(images.clamp(0, 1), (torch.rand(b, generator=generator) * 2 - 1) * cfg.hue)
    grey = images.mean(dim=1, keepdim=True)
    images = grey + (images - grey) * _rand(b, *cfg.saturation, generator, images)  # saturation
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = mean + (images - mean) * _rand(b, 0.7, 1.3, generator, images)  # contrast
    images = images + _rand(b, -0.12, 0.12, generator, images)  # brightness
    images = images.clamp(1e-4, 1) ** _rand(b, 0.75, 1.33, generator, images)  # gamma
    to_grey = (torch.rand(b, 1, 1, 1, generator=generator) < cfg.grey_p).to(images.device)
    return torch.where(to_grey, images.mean(dim=1, keepdim=True).expand_as(images), images)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma for the whole (sub)batch."""
    radius = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(images)
    c = images.shape[1]
    horizontal = kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    vertical = kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), horizontal, groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), vertical, groups=c)


def gaussian_noise(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of `shape` on `like`'s device and dtype. On the CPU it comes from
    `generator` itself (the stream the shipped models were trained with); on another device from
    a generator there, seeded from `generator`: drawing a batch of per-pixel noise on the CPU and
    copying it over took 12 ms of a 80 ms GPU step (torch profiler on a lent H200)."""
    if like.device.type == "cpu":
        return torch.randn(shape, generator=generator).to(like)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(shape, generator=device_generator, device=like.device, dtype=like.dtype)


def optics(images: torch.Tensor, generator: torch.Generator, share: float = 2 / 3) -> torch.Tensor:
    """Blur half of a `share` of the batch, resample the other half at low resolution, add noise."""
    b, _, h, w = images.shape
    u = torch.rand(b, generator=generator)
    choice = torch.where(u < share / 2, 1, torch.where(u < share, 2, 0)).to(images.device)
    out = images.clone()
    blurred = choice == 1
    if blurred.any():
        sigma = float(torch.rand(1, generator=generator) * 1.4 + 0.4)
        out[blurred] = gaussian_blur(images[blurred], sigma)
    lowres = choice == 2
    if lowres.any():
        factor = float(torch.rand(1, generator=generator) * 0.5 + 0.35)
        small = F.interpolate(images[lowres], scale_factor=factor, mode="bilinear", antialias=True)
        out[lowres] = F.interpolate(small, size=(h, w), mode="bilinear")
    noise = gaussian_noise(out.shape, generator, out) * _rand(b, 0.0, 0.03, generator, out)
    return (out + noise).clamp(0, 1)


def augment_batch(images_uint8: torch.Tensor, out_size: int, generator: torch.Generator,
                  cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Full training augmentation: uint8 (B, 3, H, W) -> float (B, 3, out, out) in [0, 1]."""
    images = images_uint8.float().div_(255)
    images = random_affine(images, out_size, generator, cfg.zoom)
    images = colour_jitter(images, generator, cfg)
    return optics(images, generator, cfg.optics_share)
