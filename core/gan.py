"""A small class-conditional GAN for synthetic images of rare cell types (issue 4).

Generator: DCGAN-style transposed convolutions with *conditional* batch norm (a gain and a
bias per class and layer, as in SNGAN/BigGAN) plus the class embedding concatenated to the
noise. Discriminator: strided convolutions with spectral norm and a *projection* head
(Miyato & Koyama 2018): ``D(x, y) = w . phi(x) + embed(y) . phi(x)``, so the label enters as
a dot product with the features instead of as an input channel.

Sized for a 2-core CPU: transposed 4x4 convolutions cost ~2x less than upsample + 3x3 conv,
and the channel widths halve whenever the resolution doubles, so every layer costs about the
same. Images are in [-1, 1]; `to_pil` converts them for writing.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.parametrizations import spectral_norm


@dataclass(frozen=True)
class GanConfig:
    """The class-conditional GAN architecture as data (kept in its sidecar)."""
    n_classes: int  # number of conditioning classes (index = position in the class list)
    image_size: int = 64  # output side in pixels: a power of two, 32 to 256
    z_dim: int = 128  # noise dimension
    g_channels: int = 32  # generator width at 32 px; doubles per halving of resolution
    d_channels: int = 32  # discriminator width at 32 px; doubles per halving of resolution
    embed_dim: int = 64  # class embedding concatenated to the noise
    max_channels: int = 256  # cap on the widest layers (keeps 4x4 layers cheap)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GanConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def n_upsamplings(self) -> int:
        levels = math.log2(self.image_size / 4)
        if self.image_size < 32 or levels != int(levels):
            raise ValueError(f"image_size must be a power of two >= 32, got {self.image_size}")
        return int(levels)


def _width(base: int, size: int, cap: int) -> int:
    """Channels at a resolution: `base` at 32 px, x2 per halving, /2 per doubling (>= 8)."""
    return max(8, min(cap, int(base * 32 / size)))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine; gain and bias are looked up per class."""

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.gain = nn.Embedding(n_classes, channels)
        self.bias = nn.Embedding(n_classes, channels)
        nn.init.ones_(self.gain.weight)  # start as plain batch norm
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.gain(y)[:, :, None, None] + self.bias(y)[:, :, None, None]


class Generator(nn.Module):
    """(z, class index) -> image in [-1, 1] of `config.image_size`."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.config = config
        c = config
        sizes = [4 * 2 ** i for i in range(c.n_upsamplings + 1)]  # 4, 8, ..., image_size
        widths = [_width(c.g_channels, s, c.max_channels) for s in sizes]
        self.embed = nn.Embedding(c.n_classes, c.embed_dim)
        self.project = nn.Linear(c.z_dim + c.embed_dim, widths[0] * 16)
        self.norms = nn.ModuleList([ConditionalBatchNorm(w, c.n_classes) for w in widths[:-1]])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
                                  for a, b in zip(widths[:-1], widths[1:])])
        # a 3x3 conv at full resolution smooths the checkerboard of the last transposed conv
        self.out_norm = ConditionalBatchNorm(widths[-1], c.n_classes)
        self.to_rgb = nn.Conv2d(widths[-1], 3, 3, 1, 1)
        self.widths = widths

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(y)], dim=1)).view(z.shape[0], self.widths[0], 4, 4)
        for norm, up in zip(self.norms, self.ups):
            h = up(F.relu(norm(h, y)))
        return torch.tanh(self.to_rgb(F.relu(self.out_norm(h, y))))


class Discriminator(nn.Module):
    """(image, class index) -> one unbounded score per image (hinge loss)."""

    def __init__(self, config: GanConfig):
        super().__init__()
        self.config = config
        c = config
        sizes = [c.image_size // 2 ** (i + 1) for i in range(c.n_upsamplings)]  # size/2 ... 4
        # d_channels at 32 px, doubling per halving: every layer costs about the same
        widths = [_width(c.d_channels, s, c.max_channels) for s in sizes]
        self.convs = nn.ModuleList([spectral_norm(nn.Conv2d(a, b, 4, 2, 1))
                                    for a, b in zip([3] + widths[:-1], widths)])
        # one 3x3 layer at 4x4 for some capacity where it is cheapest
        self.last = spectral_norm(nn.Conv2d(widths[-1], widths[-1], 3, 1, 1))
        self.linear = spectral_norm(nn.Linear(widths[-1], 1))
        self.embed = spectral_norm(nn.Embedding(c.n_classes, widths[-1]))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x): (B, C) sum-pooled features."""
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
        return F.leaky_relu(self.last(x), 0.1).sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        phi = self.features(x)
        # projection: the class enters only through this inner product
        return self.linear(phi).squeeze(1) + (self.embed(y) * phi).sum(dim=1)


def d_hinge_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: push real scores above +1 and fake ones below -1."""
    return F.relu(1 - real_scores).mean() + F.relu(1 + fake_scores).mean()


def g_hinge_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss: raise the discriminator's score of fakes."""
    return -fake_scores.mean()


@torch.no_grad()
def update_ema(ema: Generator, model: Generator, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameters only (see `standing_stats`)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def standing_stats(generator: Generator, batches: int = 8, batch_size: int = 64, seed: int = 0) -> None:
    """Recompute the batch-norm running statistics of `generator` with its current weights.

    An EMA generator's weights never produced the running statistics it would inherit, and
    samples in eval mode would drift; averaging the statistics over a few fresh batches of
    random classes (BigGAN's "standing stats") fixes that and makes sampling independent of
    the batch size.
    """
    rng = torch.Generator().manual_seed(seed)
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    generator.train()
    c, device = generator.config, next(generator.parameters()).device
    for _ in range(batches):
        z = torch.randn(batch_size, c.z_dim, generator=rng)
        generator(z.to(device), torch.randint(0, c.n_classes, (batch_size,), generator=rng).to(device))
    for m in norms:
        m.momentum = 0.1
    generator.eval()


@torch.no_grad()
def generate(generator: Generator, label: int, n: int, seed: int, batch_size: int = 64) -> torch.Tensor:
    """n images of class index `label` in [-1, 1], (n, 3, S, S); eval mode, seeded noise."""
    generator.eval()
    rng = torch.Generator().manual_seed(seed)  # CPU noise: the same images on any device
    device = next(generator.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        z = torch.randn(m, generator.config.z_dim, generator=rng).to(device)
        out.append(generator(z, torch.full((m,), label, dtype=torch.long, device=device)).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, generator.config.image_size, generator.config.image_size)


def to_pil(images: torch.Tensor, size: int | None = None) -> list[Image.Image]:
    """[-1, 1] (B, 3, S, S) -> RGB PIL images, optionally resized (bicubic) to size x size."""
    array = ((images.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    result = [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).numpy())) for a in array]
    if size and size != images.shape[-1]:
        result = [im.resize((size, size), Image.Resampling.BICUBIC) for im in result]
    return result


def image_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """Tile (B, 3, S, S) images in [-1, 1] into one picture of `rows` rows, 2 px gaps."""
    b, _, s, _ = images.shape
    cols = math.ceil(b / rows)
    canvas = Image.new("RGB", (cols * (s + 2) + 2, rows * (s + 2) + 2), (255, 255, 255))
    for i, tile in enumerate(to_pil(images)):
        canvas.paste(tile, (2 + (i % cols) * (s + 2), 2 + (i // cols) * (s + 2)))
    return canvas
